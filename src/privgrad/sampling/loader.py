"""DataLoader glue: a loader over the same data set whose batches are Poisson samples.

The returned loader keeps the user's data set, ``collate_fn``, workers and pinning; only the
batch sampler changes. An empty sample still yields a batch, of size 0 and of the same structure
as a real one (tensors with a leading dimension of 0, empty lists), so the training loop runs an
ordinary step on it and the step still adds the full noise.

The loader also tells the engine what it handed to the training loop (``DrawnBatches``):
how many batches so far and how many examples each held, so that the engine can refuse a backward
pass whose per-example rows are not the examples the sampler drew.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
)
from torch.utils.data.dataloader import default_collate

from privgrad.errors import ConfigError
from privgrad.sampling.poisson import PoissonSampler


class DrawnBatches:
    """The batches the Poisson loader handed to the training loop, as ``(number, size)``.

    The batch sampler queues each sample's size when the loader asks for its indices (perhaps
    ahead of time, for prefetching workers); the loader delivers them, in order, as it yields
    each batch. ``delivered`` counts the batches yielded so far (the number of the latest);
    ``pending`` lists those yielded since the last ``released()`` one; ``step_of()`` gives the
    sampler step that drew a pending batch (cyclic sampling: which group it holds).

    A sampler that knows more about each sample than its indices (the user of each row, how
    many rows are real) appends one note per sample to its ``notes`` deque; the note is queued
    and delivered with its batch, and ``note(number)`` gives it back. Subclasses name it
    (``DrawnUsers.units``, ``DrawnPadded.real_rows``) and set ``LATEST_ONLY``.

    Not private: the sizes depend on the sample and are kept for the engine's checks only.

    Args:
        sampler: the sampler whose ``notes`` (if it has them) to take in step with its samples.
    """

    KEEP = 64  #: batches remembered at most (a loop that never steps must not grow memory)
    #: a new pass over the loader abandons the batches of the last one that no step released
    #: (for steps that must train on the batch yielded last: user-level and padded batches)
    LATEST_ONLY = False

    def __init__(self, sampler=None):
        self.delivered = 0
        self.sampler = sampler
        self._notes_of = getattr(sampler, "notes", None)
        self._queued: deque[tuple[int, int | None, object]] = deque()
        self._pending: deque[tuple[int, int]] = deque(maxlen=self.KEEP)
        self._steps: deque[tuple[int, int | None]] = deque(maxlen=self.KEEP)
        self._notes: dict[int, object] = {}

    def queue(self, size: int, step: int | None = None) -> None:
        note = self._notes_of.popleft() if self._notes_of is not None else None
        self._queued.append((size, step, note))

    def restart(self) -> None:
        """A new pass over the loader: sizes queued for the last one will not be delivered."""
        self._queued.clear()
        if self._notes_of is not None:
            self._notes_of.clear()
        if self.LATEST_ONLY:
            self._pending.clear()

    def deliver(self) -> None:
        self.delivered += 1
        size, step, note = self._queued.popleft()
        self._pending.append((self.delivered, size))
        self._steps.append((self.delivered, step))
        if note is not None:
            self._notes[self.delivered] = note
            self._notes.pop(self.delivered - self.KEEP, None)

    def step_of(self, number: int) -> int | None:
        """The sampler step that drew batch ``number`` (``None`` if not known)."""
        return next((step for n, step in self._steps if n == number), None)

    def note(self, number: int):
        """The sampler's note on batch ``number`` (``None`` if it was not yielded, is too old,
        or the sampler takes none)."""
        return self._notes.get(number)

    @property
    def pending(self):
        """``(number, size)`` of the batches yielded and not yet released, oldest first."""
        return self._pending

    def released(self, number: int) -> None:
        """The batch ``number`` was released: it and the batches yielded before it are done
        (one the loop skipped, or prefetched by a consumer that reads ahead)."""
        while self._pending and self._pending[0][0] <= number:
            self._pending.popleft()


class PoissonBatchSampler(Sampler[list[int]]):
    """A torch batch sampler over a [`PoissonSampler`][privgrad.sampling.poisson.PoissonSampler]
    (lists of indices, maybe empty)."""

    def __init__(self, sampler: PoissonSampler, drawn: DrawnBatches | None = None):
        self.sampler = sampler
        self.drawn = drawn

    def __iter__(self) -> Iterator[list[int]]:
        for indices in self.sampler:
            if self.drawn is not None:
                self.drawn.queue(len(indices), self.sampler.step - 1)
            yield indices.tolist()

    def __len__(self) -> int:
        return len(self.sampler)


def empty_like_batch(batch):
    """The same structure as ``batch`` with zero examples.

    Tensors keep their trailing shape and dtype; a list of plain values (strings, numbers: one
    per example, as ``default_collate`` makes of strings) becomes empty; containers of tensors
    keep their structure.
    """
    if isinstance(batch, torch.Tensor):
        return batch[:0]
    if isinstance(batch, Mapping):
        items = {k: empty_like_batch(v) for k, v in batch.items()}
        try:
            return type(batch)(items)
        except TypeError:
            return items
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(empty_like_batch(v) for v in batch))
    if isinstance(batch, (tuple, list)):
        if batch and all(isinstance(v, (str, bytes, int, float, bool)) or v is None for v in batch):
            return type(batch)()
        return type(batch)(empty_like_batch(v) for v in batch)
    return batch


class EmptyBatchCollate:
    """Wraps a ``collate_fn`` so that an empty index list gives an empty batch, not an error.

    The structure of an empty batch is learned once by collating the first record and cutting it
    to zero examples (this reads a record but releases nothing about it).
    """

    def __init__(self, collate_fn, dataset):
        self.collate_fn = collate_fn
        self.dataset = dataset
        self._empty = None

    def __call__(self, records: Sequence):
        if len(records):
            return self.collate_fn(records)
        if self._empty is None:
            self._empty = empty_like_batch(self.collate_fn([self.dataset[0]]))
        return self._empty


def check_loader(data_loader: DataLoader, poisson_sampling: bool) -> None:
    """Refuse loaders whose sampling privgrad would silently replace or cannot account for."""
    if not isinstance(data_loader, DataLoader):
        raise ConfigError(
            f"data_loader must be a torch.utils.data.DataLoader; got data_loader="
            f"{type(data_loader).__name__}. Wrap your data set: DataLoader(dataset, batch_size=...).")
    if not poisson_sampling or isinstance(data_loader, PoissonLoader):
        return  # (a loader privgrad returned: a second run samples the same data set anew)
    inner = getattr(data_loader.batch_sampler, "sampler", None)
    if isinstance(data_loader.sampler, DistributedSampler) or isinstance(inner, DistributedSampler):
        raise ConfigError(
            "the data loader must cover the whole data set: privgrad itself splits one global "
            "Poisson sample between the ranks (each example included with probability q, exactly "
            "once across ranks), and a sharding sampler would make batch_size a per-rank size; "
            "got data_loader.sampler=DistributedSampler. Build DataLoader(full_dataset, "
            "batch_size=<expected batch size of the whole job>) with no sampler, the same on every "
            "rank (see docs/distributed.md).")
    if isinstance(data_loader.dataset, IterableDataset):
        raise ConfigError(
            "Poisson sampling needs a map-style data set (indexable, with a length); got "
            f"data_loader.dataset={type(data_loader.dataset).__name__} (an IterableDataset). Use "
            "a map-style Dataset, or pass poisson_sampling=False and accept that the accounting "
            "assumes Poisson sampling.")
    batch_sampler = data_loader.batch_sampler
    sampler = data_loader.sampler
    plain_batches = batch_sampler is None or type(batch_sampler) is BatchSampler
    if not plain_batches or type(sampler) not in (RandomSampler, SequentialSampler):
        custom = type(batch_sampler if not plain_batches else sampler).__name__
        raise ConfigError(
            "privgrad replaces the loader's sampling with Poisson sampling, which its privacy "
            f"accounting assumes; got a custom sampler ({custom}). Build the DataLoader with "
            "batch_size=... and no sampler, or pass poisson_sampling=False (the accounting will "
            "then not match your sampling).")


class PoissonLoader(DataLoader):
    """The loader ``make_private`` returns: a plain ``DataLoader`` over the user's data set with
    a ``PoissonBatchSampler``, which reports each batch it yields to ``DrawnBatches``
    (batches come out in sampling order: ``in_order`` is always true).

    Attributes:
        sampling: the [`SamplingPlan`][privgrad.sampling.plan.SamplingPlan] it was made from (so
            that ``make_private`` can take this loader again, for a second run on the same data).
    """

    sampling = None

    def __iter__(self):
        drawn = getattr(self.batch_sampler, "drawn", None)
        if drawn is None:
            yield from super().__iter__()
            return
        drawn.restart()
        for batch in super().__iter__():
            drawn.deliver()
            yield batch


def poisson_loader(data_loader: DataLoader, sampler: PoissonSampler,
                   drawn: DrawnBatches | None = None) -> DataLoader:
    """A DataLoader over ``data_loader.dataset`` whose batches are Poisson samples (reported to
    ``drawn`` as they are yielded, when given)."""
    dl = data_loader
    collate = dl.collate_fn if dl.collate_fn is not None else default_collate
    if isinstance(collate, EmptyBatchCollate):  # a loader privgrad returned before
        collate = collate.collate_fn
    kwargs = dict(
        num_workers=dl.num_workers,
        collate_fn=EmptyBatchCollate(collate, dl.dataset),
        pin_memory=dl.pin_memory,
        timeout=dl.timeout,
        worker_init_fn=dl.worker_init_fn,
        multiprocessing_context=dl.multiprocessing_context,
        # Its own generator unless the user gave one: each epoch's iterator draws a worker seed
        # from it, which must not shift PyTorch's global random stream (noise, dropout) by a
        # draw whose timing differs between an uninterrupted and a resumed run.
        generator=dl.generator if dl.generator is not None else torch.Generator().manual_seed(
            int(torch.randint(0, 2**62, (), dtype=torch.int64))),
        persistent_workers=dl.persistent_workers,
        pin_memory_device=getattr(dl, "pin_memory_device", ""),
    )
    if dl.num_workers > 0:
        kwargs["prefetch_factor"] = dl.prefetch_factor
    if hasattr(dl, "in_order"):
        kwargs["in_order"] = True  # DrawnBatches pairs sizes with batches in sampling order
    return PoissonLoader(dl.dataset, batch_sampler=PoissonBatchSampler(sampler, drawn), **kwargs)
