"""Private LoRA fine-tuning of a sharded decoder: FSDP2 (``fully_shard``) on 2 CPU processes.

    torchrun --standalone --nproc_per_node 2 examples/fsdp_finetune.py
    torchrun --standalone --nproc_per_node 2 examples/fsdp_finetune.py --bf16   # mixed precision

A Llama-style decoder built from a ``transformers`` config (random initialisation: the base
stands in for a pretrained model too large for one device), LoRA adapters from ``peft`` on every
projection, every decoder layer and the root wrapped by ``fully_shard``: each rank holds half
of every parameter (base and adapters) and gathers a layer only while it runs. The data is
real text that ships with Python: byte-level windows of the standard library's own source
files (no download). privgrad draws one Poisson sample per step for the job, each rank clips
its own examples, the clipped sums are reduce-scattered to the shards, and each rank adds the
noise for its own shard; the job reports the epsilon one process would.

On loopback-only machines add ``GLOO_SOCKET_IFNAME=lo`` in front of torchrun. ``--out`` saves
the adapters (gathered on rank 0) and each rank's engine state. What it printed on this
project's 2-core development machine is in docs/distributed.md.
"""

from __future__ import annotations

import argparse
import math
import sysconfig
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.data import DataLoader, TensorDataset
from transformers import LlamaConfig, LlamaForCausalLM

from privgrad import PrivacyEngine

SOURCES = ("argparse.py", "textwrap.py", "inspect.py", "typing.py", "dataclasses.py", "enum.py")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epsilon", type=float, default=8.0)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64, help="expected batch size of the job")
    p.add_argument("--seq", type=int, default=48, help="bytes per example")
    p.add_argument("--examples", type=int, default=4096)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--bf16", action="store_true", help="bf16 compute (FSDP2 mixed precision)")
    p.add_argument("--out", type=Path, default=None, help="save adapters and engine states")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def text_windows(n: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` training and ``n // 8`` test windows of ``length + 1`` bytes from the standard
    library's sources (disjoint halves of the text), the same on every rank."""
    folder = Path(sysconfig.get_paths()["stdlib"])
    text = b"".join((folder / name).read_bytes() for name in SOURCES)
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    half = len(data) // 2
    g = torch.Generator().manual_seed(seed)

    def windows(part: torch.Tensor, count: int) -> torch.Tensor:
        starts = torch.randint(0, len(part) - length - 1, (count,), generator=g)
        return torch.stack([part[s:s + length + 1] for s in starts.tolist()])

    return windows(data[:half], n), windows(data[half:], n // 8)


def build(args) -> torch.nn.Module:
    """The decoder, its LoRA adapters, and FSDP2 over both."""
    config = LlamaConfig(hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, vocab_size=256,
                         max_position_embeddings=args.seq, tie_word_embeddings=False)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(
        r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                        "down_proj"]))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if args.bf16 else MixedPrecisionPolicy()
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def loss_of(model, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy (every example has the same length, so this is the mean
    over examples of each example's own mean)."""
    logits = model(input_ids=tokens[:, :-1]).logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


@torch.no_grad()
def test_loss(model, test: torch.Tensor) -> float:
    return float(sum(loss_of(model, chunk) * len(chunk) for chunk in test.split(64)) / len(test))


def main(argv=None) -> None:
    args = parse_args(argv)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(args.seed)  # every rank initialises alike (FSDP2 does not broadcast)
    train, test = text_windows(args.examples, args.seq, args.seed)
    model = build(args)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    engine = PrivacyEngine()
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=model, optimizer=optimizer,
        data_loader=DataLoader(TensorDataset(train), batch_size=args.batch_size),
        target_epsilon=args.epsilon, target_delta=args.delta, epochs=args.epochs,
        max_grad_norm=args.max_grad_norm)
    say = print if rank == 0 else (lambda *a, **k: None)
    total = sum(p.numel() for p in model.parameters())
    say(f"{world} process(es), FSDP2{' bf16' if args.bf16 else ''}: {total:,} parameters "
        f"({sum(p.numel() for p in trainable):,} LoRA, trainable), {total // world:,} a rank; "
        f"sigma = {engine.settings.noise_multiplier:.3f}, q = {engine.settings.sample_rate:.4f}, "
        f"{len(loader)} steps per epoch")
    say(f"before: test loss {test_loss(model, test):.3f} nats/byte (uniform: {math.log(256):.3f})")
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        for (tokens,) in loader:
            optimizer.zero_grad()
            loss_of(model, tokens).backward()
            optimizer.step()
        say(f"epoch {epoch}: test loss {test_loss(model, test):.3f}  "
            f"epsilon {engine.get_epsilon(args.delta):.2f}")
    took = time.perf_counter() - start
    say(f"{engine.steps} steps in {took:.0f} s ({1000 * took / engine.steps:.0f} ms per step); "
        f"epsilon spent: {engine.get_epsilon(args.delta):.2f} at delta = {args.delta:g}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        torch.save(engine.state_dict(), args.out / f"engine.rank{rank}.pt")  # its noise stream
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                    cpu_offload=True))
        if rank == 0:
            torch.save({k: v for k, v in full.items() if "lora_" in k}, args.out / "adapters.pt")
            say(f"saved {args.out / 'adapters.pt'} and engine.rank<r>.pt")
    engine.detach()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
