"""Checking a module's per-sample gradients, norms and weighted sums, in every engine mode,
against the one-example references (float64): :func:`privgrad.testing.check_rule`, the harness
the built-in rules are tested with.

:func:`check_module` is that harness on exactly the batch a test gives (the tests choose their
batch sizes themselves: hypothesis draws 0 and 1 among others, and a layer that cannot run an
empty batch, like torch's InstanceNorm, is not asked to).
"""

from __future__ import annotations

from functools import partial

from privgrad.testing import check_rule

__all__ = ["check_module"]

check_module = partial(check_rule, batch_sizes=())
