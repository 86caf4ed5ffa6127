"""Independent references for per-sample gradients: ``torch.func.grad`` per example, and a plain
autograd loop over examples. Both run one example at a time, so they cannot share a bug with the
batched rules. They are published with the harness that uses them, :mod:`privgrad.testing`.

A case is described by ``example(i) -> (args, kwargs)``, the inputs of example ``i`` alone (with
a batch dimension of 1), and ``loss(i, output) -> scalar``, example ``i``'s own loss.
"""

from __future__ import annotations

from privgrad.testing import assert_close, func_per_example, loop_per_example

__all__ = ["assert_close", "func_per_example", "loop_per_example"]
