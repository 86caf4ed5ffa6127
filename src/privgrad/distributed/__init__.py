"""Data-parallel private training on ``torch.distributed``: the only package that imports it.

``PrivacyEngine.make_private`` uses ``data_parallel()`` to decide whether it trains
data-parallel (an initialised process group, or ``distributed=True``) and then the returned
[`DataParallel`][privgrad.distributed.context.DataParallel] for the collective steps (for a
model sharded with FSDP2's ``fully_shard``, a
[`ShardedDataParallel`][privgrad.distributed.fsdp.ShardedDataParallel]). See
docs/distributed.md.
"""

from privgrad.distributed.context import DataParallel, data_parallel, privacy_fingerprint
from privgrad.distributed.sharding import ShardedSampler

__all__ = ["DataParallel", "ShardedSampler", "data_parallel", "privacy_fingerprint"]
