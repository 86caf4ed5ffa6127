"""User-level clipping: one backward pass's captures turned into captures over *units* (users).

Under ``privacy_unit="user"`` the clipped vector is a user's gradient, the sum of its examples'
per-sample gradients, not one example's. ``by_unit()`` rewrites the captures of a pass so
that everything downstream (norms, the cost model, ghost or materialised sums, clipping,
non-finite drops) runs unchanged with the users as its batch:

- a rule that declares ``LayerRule.stacks_examples`` (its per-sample gradient is a sum over
  every dimension between the batch and the features: ``nn.Linear``, ``nn.Embedding``,
  ``nn.LayerNorm``, ``nn.RMSNorm``) gets a capture whose batch is the users and whose positions
  are the user's examples stacked: ``(B, *rest) -> (U, k, *rest)``, padded with zero rows. The
  ghost-norm identity over (position, position) pairs is then exactly the identity over all
  (example, row) pairs of one user, which is the squared norm of the user's sum; no per-rule code.
- every other rule (convolutions, recurrent layers, attention, the generic ``torch.func`` rule,
  tied parameters) materialises per-example gradients and adds them up by user
  (``index_add``) before the norm: exact for any rule.

Index letters: ``b`` example (row of the pass), ``u`` user (unit), ``k`` a user's row slot.

Privacy:
    A padded slot has a zero output gradient, and a per-sample gradient is linear in the output
    gradient, so padding adds exactly nothing to a user's gradient (whatever the padded input
    holds). Each user's rows must all be in this pass (``check_complete()``): a user split between
    two passes would be clipped twice, at up to ``2C``.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.utils._pytree import tree_map

from privgrad.errors import PrivacyStateError
from privgrad.layers import Capture

__all__ = ["Units", "by_unit", "dense_labels"]


@dataclasses.dataclass(frozen=True)
class Units:
    """Which unit (user) each row of a pass belongs to.

    Attributes:
        labels: ``(B,)`` int64, the unit of row ``b``, dense in ``0 .. count - 1``.
        count: ``U``, the number of units in the pass.
        slot: ``(B,)`` int64, ``u * width + (rank of b among its unit's rows)``.
        width: ``k``, the most rows any unit has in the pass.
    """

    labels: torch.Tensor
    count: int
    slot: torch.Tensor
    width: int

    @classmethod
    def of(cls, labels: torch.Tensor) -> Units:
        """The units of ``labels`` (any ints, one per row; relabelled densely)."""
        labels = dense_labels(labels)
        rows = labels.numel()
        if rows == 0:
            return cls(labels, 0, labels, 0)
        count = int(labels.max()) + 1
        sizes = torch.bincount(labels, minlength=count)
        order = torch.argsort(labels, stable=True)
        starts = torch.cumsum(sizes, 0) - sizes
        rank = torch.empty_like(labels)
        rank[order] = torch.arange(rows, device=labels.device) - starts[labels[order]]
        width = int(sizes.max())
        return cls(labels, count, labels * width + rank, width)

    def stack(self, x):
        """``(B, *rest) -> (U, k, *rest)`` for a tensor with ``B`` rows, zero-padded; other
        values as they are."""
        rows = self.labels.numel()
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] != rows:
            return x
        out = x.new_zeros((self.count * self.width, *x.shape[1:]))
        out[self.slot] = x
        return out.view(self.count, self.width, *x.shape[1:])

    def add_up(self, g: torch.Tensor) -> torch.Tensor:
        """``(B, *shape) -> (U, *shape)``: per-example gradients summed by unit."""
        out = g.new_zeros((self.count, *g.shape[1:]))
        return out.index_add_(0, self.labels.to(g.device), g)


def dense_labels(labels: torch.Tensor) -> torch.Tensor:
    """``labels`` renumbered ``0 .. U - 1`` (int64; the order of the units does not matter)."""
    labels = torch.as_tensor(labels, dtype=torch.int64)
    if labels.numel() == 0:
        return labels
    return torch.unique(labels, return_inverse=True)[1]


def by_unit(captures: list[Capture], units: Units, params_of) -> list[Capture]:
    """The captures of one pass over ``units`` instead of rows (see the module docstring).

    ``params_of(capture) -> {name: parameter}``. A parameter used by several calls (tied
    weights) has its uses materialised and added up by the engine: such captures are
    materialised here too, per unit."""
    uses: dict = {}
    for c in captures:
        for p in params_of(c).values():
            uses[p] = uses.get(p, 0) + 1
    out = []
    for c in captures:
        device = _device(c)
        if device is not None and units.labels.device != device:
            units = dataclasses.replace(units, labels=units.labels.to(device),
                                        slot=units.slot.to(device))
        shared = any(uses[p] > 1 for p in params_of(c).values())
        if c.early is None and c.rule.stacks_examples and not shared:
            out.append(_stacked(c, units))
            continue
        grads = c.early if c.early is not None else c.rule.per_sample_gradients(
            c.module, c, c.names)
        out.append(dataclasses.replace(
            c, args=(), kwargs={}, grad_outputs=[], scratch={}, outputs=[], batch_size=units.count,
            early={n: units.add_up(g) for n, g in grads.items()}))
    return out


def _stacked(c: Capture, units: Units) -> Capture:
    """``c`` with its examples stacked by unit: batch ``U``, each unit's rows as positions."""
    return dataclasses.replace(
        c, args=tree_map(units.stack, c.args), kwargs=tree_map(units.stack, c.kwargs),
        grad_outputs=[units.stack(g) for g in c.grad_outputs], batch_size=units.count,
        scratch={}, outputs=[], method=None)  # new shapes: the method is chosen again


def _device(c: Capture):
    for g in c.grad_outputs:
        if isinstance(g, torch.Tensor):
            return g.device
    if c.early:
        return next(iter(c.early.values())).device
    return None


def check_complete(labels_here, labels_step, offset: int) -> None:
    """Refuse a pass (a physical batch) that holds only part of some user's rows of the step.

    ``labels_step``: the unit of every row of the logical step, ``labels_here`` the slice
    ``[offset, offset + rows)`` of it that this pass holds."""
    here = torch.as_tensor(labels_here)
    step = torch.as_tensor(labels_step)
    if here.numel() == 0:
        return
    inside = torch.isin(step, here)
    positions = torch.nonzero(inside).flatten()
    if int(positions.numel()) != here.numel() or (
            positions.numel() and (int(positions[0]) != offset
                                   or int(positions[-1]) != offset + here.numel() - 1)):
        raise PrivacyStateError(
            f"under privacy_unit='user' all of a user's rows must be in one backward pass; got a "
            f"physical batch of {here.numel()} rows (from row {offset} of the drawn batch) that "
            f"splits a user's rows with another physical batch. Each part would be clipped to C "
            f"on its own, and the user's contribution could reach a multiple of C. Raise "
            f"max_physical_batch_size to at least the drawn batch, or run the drawn batch in one "
            f"pass. Nothing was released.")


def pass_units(rows, tags: set, captures: list[Capture]) -> Units | None:
    """The users of a backward pass's rows, from the loader's record (``rows``: the engine's
    ``DrawnRows``, whose ``drawn`` records the user of each row of every batch it yielded).

    ``None`` where the pass is not on a batch the loader drew (such a pass is set aside and
    never released; ``DrawnRows`` decides). Raises if the pass splits a user with another pass
    of the step, or if it cannot be told to be on the batch drawn last (``latest_batch()``)."""
    found = latest_batch(rows, tags, captures, "units", len)
    if found is None:
        return None
    step, offset, count = found
    here = torch.as_tensor(step[offset:offset + count])
    check_complete(here, torch.as_tensor(step), offset)
    return Units.of(here)


def latest_batch(rows, tags: set, captures: list[Capture], record: str, size_of):
    """``(what the loader recorded of the batch, row offset of this pass, rows of this pass)``
    for a pass on the batch the loader yielded last, or ``None`` if no drawn batch waits.

    Under user-level privacy and fixed-shape batches the rows alone cannot say which batch a
    pass ran on (a user's rows, or the real rows among the padding, differ between batches of
    one size), so the pass must be on the batch yielded last and no other batch may wait: a
    loop that reads ahead or skips a batch is refused. ``record``: the name of the loader
    record's method (``units``, ``real_rows``); ``size_of(recorded) -> rows of the batch``."""
    sizes = {c.batch_size for c in captures}
    if len(tags) != 1 or len(sizes) != 1 or rows.drawn is None:
        return None
    tag, count = next(iter(tags)), sizes.pop()
    record_of = getattr(rows.drawn, record, None)
    recorded = record_of(tag) if record_of is not None and tag is not None else None
    pending = [number for number, _ in rows.drawn.pending]
    if recorded is None or not pending:
        return None  # no drawn batch waits: the pass is set aside (engine.rows)
    offset = rows.rows if rows.step_tag == tag else 0
    if pending != [tag] or offset + count > size_of(recorded):
        raise PrivacyStateError(
            f"under user-level privacy and fixed-shape batches each step must train on the "
            f"batch the loader yielded last, and on no other; got a backward pass of {count} "
            f"rows while batches {pending} wait for a step (the latest: {tag}). A loop that "
            f"reads batches ahead or skips one leaves the engine unable to tell whose rows it "
            f"clips (rows of one user could be clipped as two, padding taken for data). Run "
            f"forward, backward and optimizer.step() on every batch as it comes (an empty one "
            f"too). Nothing was released.")
    return recorded, offset, count


def check_release(rows) -> None:
    """Before a user-level release: the step's rows are the whole batch the loader yielded
    last, whose users ``pass_units()`` read (not an earlier batch of the same size)."""
    units_of = getattr(rows.drawn, "units", None)
    step = units_of(rows.step_tag) if units_of is not None and rows.step_tag is not None else None
    if step is None or len(step) != rows.rows:
        raise PrivacyStateError(
            f"under privacy_unit='user' a step must train on the whole batch the loader yielded "
            f"last; got {rows.rows} rows where it holds "
            f"{'an unknown number of' if step is None else len(step)}. Run forward, backward and "
            f"optimizer.step() on each batch as it comes, all of its rows. Nothing was released.")
