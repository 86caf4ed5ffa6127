"""Per-rank peak memory and step time of a decoder under FSDP2 against DDP, private and not.

    torchrun --standalone --nproc_per_node 2 benchmarks/fsdp.py --mode fsdp-private
    torchrun --standalone --nproc_per_node 2 benchmarks/fsdp.py --mode ddp-private   # etc.

Runs: ``fsdp`` / ``fsdp-private`` (every decoder layer and the root wrapped by ``fully_shard``)
and ``ddp`` / ``ddp-private`` (the whole model on every rank: ``DistributedDataParallel`` for
the non-private run, privgrad's data-parallel path on the plain model for the private one). The
model is a Llama decoder from a ``transformers`` config, random initialisation; its embeddings
and norms are frozen in every run (the same trainable set everywhere: every ``nn.Linear``,
lm_head included), AdamW. Memory is the process's peak resident set (``VmHWM``) over the
training steps, after the peak was reset once the model, the optimizer and privgrad were set
up (``/proc/self/clear_refs``), so it counts what training holds, not building a full model
before sharding it (the resident set right after set-up is printed too: the allocator keeps
some freed blocks). Time: rank 0's wall clock per step after ``--warmup`` steps (median).
Nothing is asserted (benchmarks are not tests).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset
from transformers import LlamaConfig, LlamaForCausalLM

from privgrad import PrivacyEngine


def rss_mib(field: str = "VmHWM") -> float:
    """``VmHWM`` (peak resident set) or ``VmRSS`` (now) of this process, in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["fsdp", "fsdp-private", "ddp", "ddp-private"],
                        required=True)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8, help="expected batch of the job")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=args.hidden // 64, vocab_size=args.vocab,
                         max_position_embeddings=args.seq, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    for name, p in model.named_parameters():
        p.requires_grad_("proj" in name or "lm_head" in name)  # every nn.Linear
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    private, sharded = args.mode.endswith("private"), args.mode.startswith("fsdp")
    if sharded:
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    elif not private:
        model = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    n = 128 * args.batch
    data = TensorDataset(torch.randint(0, args.vocab, (n, args.seq + 1),
                                       generator=torch.Generator().manual_seed(1)))
    loader = DataLoader(data, batch_size=args.batch if private else args.batch // world)
    engine = PrivacyEngine()
    if private:
        model, optimizer, loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0,
            max_grad_norm=1.0)
    with open("/proc/self/clear_refs", "w") as f:  # peak from here on
        f.write("5")
    start_rss = rss_mib("VmRSS")  # what set-up left (the allocator keeps freed blocks)
    times = []
    for step, (tokens,) in zip(range(args.warmup + args.steps), loader):
        dist.barrier()
        start = time.perf_counter()
        optimizer.zero_grad()
        logits = model(input_ids=tokens[:, :-1]).logits
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)) \
            .backward()
        optimizer.step()
        dist.barrier()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    peaks = [None] * world
    dist.all_gather_object(peaks, (start_rss, rss_mib()))
    if rank == 0:
        eps = f", epsilon {engine.get_epsilon(1e-5):.3g}" if private else ""
        print(f"{args.mode}: {total / 1e6:.0f}M parameters ({trainable / 1e6:.0f}M trainable), "
              f"{world} ranks, expected batch {args.batch} x {args.seq} tokens; step "
              f"{statistics.median(times):.2f} s median of {len(times)} "
              f"({', '.join(f'{t:.2f}' for t in times)}); peak RSS per rank "
              f"{', '.join(f'{p:.0f}' for _, p in peaks)} MiB (after set-up "
              f"{', '.join(f'{s:.0f}' for s, _ in peaks)}){eps}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
