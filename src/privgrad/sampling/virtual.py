"""Virtual batches: split each logical (Poisson) batch into physical chunks that fit in memory.

Privacy:
    Splitting changes nothing in the mechanism: every example of the logical batch is clipped
    once (in its chunk), the clipped sums of the chunks are added, and the noise is drawn once
    per logical batch, when the last chunk's ``optimizer.step()`` runs. The steps of the other
    chunks make no update. A loop that leaves in the middle of a logical batch (``break``, an
    exception) ends it: its clipped sums are discarded, so the next release carries no other
    sample's sums, and nothing of it is released or spent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from privgrad.errors import ConfigError


def batch_size_of(batch) -> int:
    """Examples in a collated batch: the first dimension of its first tensor."""
    leaves, _ = tree_flatten(batch)
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    raise ConfigError(
        f"cannot split a batch without tensors into physical batches; got a batch of type "
        f"{type(batch).__name__}. Return tensors from the data set or collate_fn.")


def split_batch(batch, max_size: int, owners=None) -> list:
    """Chunks of at most ``max_size`` examples. The batch may nest tuples, lists and dicts;
    every tensor in it whose first dimension is the batch size is split, and every other leaf
    (a scalar, a string, a tensor of another length) is passed to every chunk unchanged, so keep
    per-example data in tensors. An empty batch gives one empty chunk. ``owners`` (user-level
    privacy: the user of each row, a user's rows together) keeps each user's rows in one
    chunk: chunks end only where a user does."""
    n = batch_size_of(batch)
    if n <= max_size:
        return [batch]
    leaves, spec = tree_flatten(batch)
    chunks = []
    for start, stop in _bounds(n, max_size, owners):
        part = [
            leaf[start:stop]
            if isinstance(leaf, torch.Tensor) and leaf.dim() > 0 and leaf.shape[0] == n else leaf
            for leaf in leaves
        ]
        chunks.append(tree_unflatten(part, spec))
    return chunks


def _bounds(n: int, max_size: int, owners) -> list[tuple[int, int]]:
    if owners is None or len(owners) != n:
        return [(start, min(start + max_size, n)) for start in range(0, n, max_size)]
    ends = [b + 1 for b in range(n) if b == n - 1 or owners[b + 1] != owners[b]]
    out, start, last = [], 0, 0
    for end in ends:
        if end - last > max_size:
            raise ConfigError(
                f"max_physical_batch_size must hold one user's rows (user-level privacy clips "
                f"them together); got max_physical_batch_size={max_size} and a user with "
                f"{end - last} rows. Pass max_physical_batch_size >= max_examples_per_user.")
        if end - start > max_size:
            out.append((start, last))
            start = last
        last = end
    return [*out, (start, n)]


def _rows(batch, start: int, stop: int):
    """Rows ``start:stop`` of every tensor of ``batch`` whose first dimension is the batch."""
    n = batch_size_of(batch)
    leaves, spec = tree_flatten(batch)
    return tree_unflatten([leaf[start:stop] if isinstance(leaf, torch.Tensor) and leaf.dim() > 0
                           and leaf.shape[0] == n else leaf for leaf in leaves], spec)


class VirtualBatches:
    """Iterates physical chunks of the logical batches of ``data_loader``.

    Args:
        data_loader: the private (Poisson) loader.
        max_physical_batch_size: largest chunk.
        set_last: called with ``True`` before yielding the last chunk of a logical batch and
            ``False`` before the others (the engine defers the release until the last one).
        on_exit: called when the iteration ends, completed or abandoned (the engine discards a
            logical batch left unfinished).
        owners: user-level privacy: ``() -> the user of each row of the batch just drawn``;
            chunks then never split a user (``split_batch()``).
        chunks: sharded data-parallel training: ``(chunks this process needs) -> chunks to
            run`` (the most any process needs); the extra chunks are empty, so every process
            runs as many backward passes per logical batch as the others.
    """

    def __init__(self, data_loader: Iterable, max_physical_batch_size: int,
                 set_last: Callable[[bool], None], on_exit: Callable[[], None],
                 owners: Callable[[], object] | None = None,
                 chunks: Callable[[int], int] | None = None):
        self.data_loader = data_loader
        self.max_physical_batch_size = max_physical_batch_size
        self.set_last = set_last
        self.on_exit = on_exit
        self.owners = owners  # user-level: the users of the batch just drawn
        self.chunks = chunks

    def __iter__(self) -> Iterator:
        try:
            for batch in self.data_loader:
                owners = self.owners() if self.owners is not None else None
                chunks = split_batch(batch, self.max_physical_batch_size, owners)
                if self.chunks is not None:  # empty chunks: the rows past the end
                    n = batch_size_of(batch)
                    chunks += [_rows(batch, n, n)] * (self.chunks(len(chunks)) - len(chunks))
                for k, chunk in enumerate(chunks):
                    self.set_last(k == len(chunks) - 1)
                    yield chunk
        finally:
            self.on_exit()
