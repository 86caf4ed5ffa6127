"""The rows the engine clips must be the examples the sampler drew.

Per-sample clipping bounds one *row* of a backward pass. The guarantee needs one row to be one
example of one Poisson batch, and nothing in a tensor says so: a sequence-first model hands its
layers ``(T, B, ...)`` tensors (each position becomes an "example", and one sequence contributes
up to ``T`` times ``C``), two batches summed into one backward pass pair row ``i`` of one with row
``i`` of the other, a loop that trains on the original loader never saw a Poisson sample at all.

``DrawnRows`` holds the engine to the loader's own record (``DrawnBatches``): every module call is
tagged with the number of batches the loader had yielded when it ran (``tag``); a logical step's
calls must share one tag, and its rows (over the physical batches of virtual batches) must number
the examples of a batch the loader yielded and no step has released yet. A loop that reads one batch
ahead (a prefetching trainer) is fine; rows that match no drawn batch are refused before anything is
released.
"""

from __future__ import annotations

from privgrad.errors import PrivacyStateError

__all__ = ["DrawnRows"]

_CAUSES = (
    "Usual causes: sequence-first tensors (a (T, B, ...) input makes each position an example: "
    "give the model batch-first tensors and batch_first=True); a loss on part of the batch (keep "
    "every row and mask the loss instead); several rows per example (augmented copies: average "
    "them inside one example's computation instead). Nothing was released.")


class DrawnRows:
    """Checks each logical step's rows against the batches the private loader yielded.

    Args:
        drawn: the loader's ``DrawnBatches``, or ``None`` (no
            Poisson loader: nothing to check against).
    """

    def __init__(self, drawn):
        self.drawn = drawn
        self.step_tag: int | None = None  # the tag of this logical step's calls
        self.rows = 0  # rows of this logical step so far

    def tag(self) -> int | None:
        """The tag of a module call made now."""
        return None if self.drawn is None else self.drawn.delivered

    def add(self, tags: set, rows: int) -> bool:
        """One backward pass over calls tagged ``tags`` with ``rows`` rows: ``True`` if they join
        the logical step, ``False`` if no drawn batch is pending at all (the pass ran on rows the
        loader did not draw: a generator's backward through a private discriminator after its
        step, or a loop on the original loader; the caller must never release them). Raises if
        they cannot belong to the logical step so far."""
        if self.drawn is None:
            return True
        if len(tags) > 1:
            raise PrivacyStateError(
                f"one backward pass must go through forward passes on one drawn batch; got "
                f"forward passes made after {len(tags)} different batches of the private loader "
                f"(numbers {sorted(tags)}). Summing two batches' losses puts two samples under one "
                f"noise draw and lets an example in both contribute twice. Run one batch, one "
                f"backward, one optimizer.step(). Nothing was released.")
        tag = next(iter(tags))
        if self.step_tag is not None and tag != self.step_tag:
            raise PrivacyStateError(
                f"the physical batches of one step must come from one drawn batch; got a backward "
                f"pass on the loader's batch {tag} while clipped sums of batch {self.step_tag} "
                f"wait for their optimizer.step(). Step each batch (or abandon it by leaving "
                f"engine.virtual_batches). Nothing was released.")
        candidates = self._candidates(tag)
        if not candidates:
            return False
        if self.rows + rows > max(size for _, size in candidates):
            raise PrivacyStateError(self._mismatch(self.rows + rows, candidates))
        self.step_tag = tag
        self.rows += rows
        return True

    @staticmethod
    def undrawn(rows: int) -> str:
        """The refusal of a step whose backward passes ran on rows the loader did not draw."""
        return (f"the rows of a released step must be examples that the private loader drew; got "
                f"backward passes on {rows} rows with no batch from it since the last step. "
                f"Iterate the data_loader that make_private returned (not the original one), one "
                f"batch per optimizer.step(). (A backward pass on other data, such as a GAN "
                f"generator's through the private discriminator, is fine as long as the "
                f"discriminator's optimizer does not step on it: it is set aside and discarded.) "
                f"Nothing was released.")

    def release(self, in_order: bool = False) -> int | None:
        """The step is about to release: its rows must be exactly one drawn batch (the oldest
        pending one of that size: a loop that reads ahead steps its batches in order). Returns
        the batch's number (``None`` without a Poisson loader).

        ``in_order`` (correlated noise, where a batch's sampler step decides its noise row):
        refuse when an older drawn batch was never stepped (the loop skipped it); the batches up
        to this one are then done, so a loop that catches the error can go on."""
        if self.drawn is None:
            return None
        candidates = self._candidates(self.step_tag)
        match = next((number for number, size in candidates if size == self.rows), None)
        if match is None:
            raise PrivacyStateError(self._mismatch(self.rows, candidates))
        skipped = [number for number, _ in self.drawn.pending if number < match]
        self.drawn.released(match)
        self.reset()
        if in_order and skipped:
            raise PrivacyStateError(
                f"correlated noise needs every drawn batch stepped, in order; got a step on the "
                f"loader's batch {match} while batch(es) {skipped[:3]} were drawn and never "
                f"stepped. Each step's noise row is that of the sampler step that drew its batch, "
                f"and a skipped batch that cannot be told apart from its successor would put a "
                f"record's contributions closer than the bands allow. Run forward, backward and "
                f"optimizer.step() on every batch the loader yields (leave a batch out by "
                f"masking its loss to zero, not by skipping it). Nothing was released.")
        return match

    def discard(self) -> None:
        """This logical step's clipped sums were thrown away (a virtual batch left early, a step
        that GradScaler skips): its batch, the oldest pending one it can be, is done."""
        if self.drawn is not None and self.step_tag is not None:
            candidates = self._candidates(self.step_tag)
            if candidates:
                self.drawn.released(candidates[0][0])
        self.reset()

    def reset(self) -> None:
        """Forget this logical step (released, or its clipped sums discarded)."""
        self.step_tag, self.rows = None, 0

    def _candidates(self, tag) -> list[tuple[int, int]]:
        if tag is None:
            return []
        return [(n, size) for n, size in self.drawn.pending if n <= tag]

    @staticmethod
    def _mismatch(rows: int, candidates) -> str:
        sizes = " or ".join(str(size) for _, size in candidates[-3:])
        return (f"the rows clipped in one step must be the examples of the Poisson batch the "
                f"loader drew; got {rows} rows where the batch held {sizes} examples. {_CAUSES}")
