"""On a CUDA device: privgrad's private step gives the CPU's result, keeps its noise on the
device, and costs this much against a normal step.

    python benchmarks/gpu_check.py                         # the card: 7 models, a few minutes
    python benchmarks/gpu_check.py --device cpu --batch 2 --gpt2 tiny   # CPU against CPU

Models: the six reference models of ``reference_models.py`` and a GPT-2-size decoder
(``transformers.GPT2Config()``'s 124M parameters, random weights, no download, dropout off; its
loss is next-token cross-entropy). ``--gpt2 tiny`` takes a 2-layer one, ``--gpt2 none`` none.
For each model, one row of a Markdown table (nothing is left out: a model that cannot run says
why in its row):

- ``f64 err`` / ``f32 err``: two private steps with ``noise_multiplier=0`` (so no noise enters;
  ``max_grad_norm=1`` clips) on the device against the same two steps on the CPU, same seeds,
  same weights and batch: the largest ``||g_device - g_cpu|| / ||g_cpu||`` over every parameter
  and both steps, in float64 (must be at most ``--rtol64``) and float32 (``--rtol32``). TF32 is
  turned off for these steps (it rounds float32 products to 10 bits of mantissa, ~1e-3).
- ``on device``: after a step with noise (sigma 1) every ``p.grad`` privgrad wrote has its
  parameter's device and dtype, and a batch drawn by the engine's Poisson loader from data on
  the device is on the device (the sampler picks indices on the host, by design: they are not
  data; only the rows it selects are gathered, where they live).
- ``noise``: the generator that drew that step's noise: the engine's own generator for the
  device changed state, it is the only one the engine holds, and PyTorch's default CPU
  generator did not move (no noise drawn on the host and copied over).
- ``np ms`` / ``private ms`` / ``x np``: the non-private and private steps (float32, sigma 1)
  interleaved step by step in this process (``interleaved.interleave``), medians over
  ``--rounds`` rounds, and the median of the per-round ratios.

Exit status: 0 when every check passes (or when there is no CUDA device: one line says it was
skipped; a model whose optional library is missing says so in its row), 1 when one fails. ``--device cpu`` runs the same checks with the CPU as the device,
so that the logic is tested on machines without a GPU (its times are CPU times).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from interleaved import failure, interleave, ratio
from reference_models import MODELS, SIGMA, build, prepare

GPT2_SIZES = {  # None: transformers.GPT2Config()'s own sizes (GPT-2 small, 124M parameters)
    "gpt2": None,
    "tiny": {"vocab_size": 64, "n_positions": 32, "n_embd": 32, "n_layer": 2, "n_head": 2,
             "bos_token_id": 0, "eos_token_id": 1},
}


class NextToken(nn.Module):
    """A causal language model's logits as ``(B, vocab, T - 1)``: with the tokens shifted by one
    as targets, ``nn.CrossEntropyLoss`` is the next-token loss."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, idx):
        return self.lm(input_ids=idx).logits[:, :-1].transpose(1, 2)


def gpt2(size: str, batch: int, seq: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A GPT-2 decoder with random weights (``transformers.GPT2Config``, no download) and one
    fixed batch of random tokens with their shifted targets."""
    import transformers

    config = transformers.GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     **(GPT2_SIZES[size] or {}))
    seq = min(seq, config.n_positions)
    tokens = torch.randint(0, config.vocab_size, (batch, seq))
    return NextToken(transformers.GPT2LMHeadModel(config)), tokens, tokens[:, 1:]


def maker(name: str, args):
    """``(batch, build)``: the model's batch size and a function making ``(model, x, y)``."""
    if name == "gpt2":
        return args.gpt2_batch, lambda: gpt2(args.gpt2, args.gpt2_batch, args.seq)
    return args.batch, lambda: build(name, args.batch, "privgrad")


def private_grads(name: str, args, device, dtype) -> list[list[torch.Tensor]]:
    """The gradients privgrad writes in two private steps (sigma 0), on the CPU, per step."""
    batch, make = maker(name, args)
    torch.manual_seed(0)
    prepared = prepare(name, batch, "privgrad", device=device, dtype=dtype, sigma=0.0,
                       built=make())
    out = []
    for _ in range(2):  # the first step runs the engine's self-check, the second the fast path
        prepared.step()
        out.append([p.grad.detach().cpu() for p in prepared.params])
    return out


def largest_error(got: list[list[torch.Tensor]], want: list[list[torch.Tensor]]) -> float:
    """``max ||got - want|| / ||want||`` over every parameter of every step (float64 sums)."""
    worst = 0.0
    for step_got, step_want in zip(got, want, strict=True):
        for g, w in zip(step_got, step_want, strict=True):
            scale = max(w.double().norm().item(), torch.finfo(w.dtype).tiny)
            worst = max(worst, (g.double() - w.double()).norm().item() / scale)
    return worst


def equality(name: str, args, device) -> dict[str, float]:
    """``{"f64": error, "f32": error}`` of the device's private steps against the CPU's."""
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        return {key: largest_error(private_grads(name, args, device, dtype),
                                   private_grads(name, args, torch.device("cpu"), dtype))
                for key, dtype in (("f64", torch.float64), ("f32", torch.float32))}
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def placement(prepared, device) -> dict[str, bool]:
    """One private step with noise: where its gradients, noise and sampled batch are."""
    engine = prepared.engine
    own = engine.noise.generator(device)
    before, host = own.get_state().clone(), torch.default_generator.get_state().clone()
    prepared.step()
    grads = all(p.grad is not None and p.grad.device == p.device and p.grad.dtype == p.dtype
                for p in prepared.params)
    held = {g.device.type for g in engine.noise._generators.values()}
    noise = (not torch.equal(own.get_state(), before) and held == {device.type}
             and torch.equal(torch.default_generator.get_state(), host))
    x, _ = next(iter(prepared.loader))  # one Poisson batch of the data set on the device
    return {"grads": grads, "sampled": x.device.type == device.type, "noise": noise}


def check(name: str, args, device) -> dict:
    """Every check and the timing of one model (``error``: why it failed; ``not_run``: the
    optional library it needs is missing)."""
    r = {"model": name}
    try:
        batch, make = maker(name, args)
        r["params"] = sum(p.numel() for p in make()[0].parameters())
        r["err"] = equality(name, args, device)
        steps = {}
        for variant in ("nonprivate", "privgrad"):
            torch.manual_seed(0)
            steps[variant] = prepare(name, batch, variant, device=device, sigma=SIGMA,
                                     built=make())
        times = interleave({k: v.step for k, v in steps.items()}, args.rounds, device)
        r["ms"] = {k: statistics.median(v) for k, v in times.items()}
        r["x"] = ratio(times, "privgrad", "nonprivate")
        r["placement"] = placement(steps["privgrad"], device)
    except ImportError as e:  # transformers (for GPT-2) is optional: said, not failed
        r["not_run"] = f"{e.name or 'a module'} not importable ({e})"
    except Exception as e:  # noqa: BLE001 - the row says what broke; the others still run
        r["error"] = failure(e)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return r


def row(r: dict, args) -> tuple[str, bool]:
    """The table row of one model and whether every check passed."""
    if "not_run" in r:
        return f"| {r['model']} | - | not run: {r['not_run']} |" + " |" * 6, True
    if "error" in r:
        params = f"{r['params'] / 1e6:.2f}M" if "params" in r else "-"
        return f"| {r['model']} | {params} | fail: {r['error']} |" + " |" * 6, False
    err, place = r["err"], r["placement"]
    ok64, ok32 = err["f64"] <= args.rtol64, err["f32"] <= args.rtol32
    on_device = place["grads"] and place["sampled"]
    cells = [r["model"], f"{r['params'] / 1e6:.2f}M", f"{err['f64']:.1e} {_mark(ok64)}",
             f"{err['f32']:.1e} {_mark(ok32)}", _mark(on_device), _mark(place["noise"]),
             f"{r['ms']['nonprivate']:.2f}", f"{r['ms']['privgrad']:.2f}", f"{r['x']:.2f}"]
    return "| " + " | ".join(cells) + " |", ok64 and ok32 and on_device and place["noise"]


def _mark(good: bool) -> str:
    return "ok" if good else "FAIL"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (CPU against CPU)")
    ap.add_argument("--models", default=",".join(MODELS) + ",gpt2")
    ap.add_argument("--batch", type=int, default=32, help="batch of the six reference models")
    ap.add_argument("--gpt2", choices=(*GPT2_SIZES, "none"), default="gpt2")
    ap.add_argument("--gpt2-batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128, help="GPT-2's sequence length")
    ap.add_argument("--rounds", type=int, default=10, help="timed rounds (one step of each)")
    ap.add_argument("--rtol64", type=float, default=1e-9)
    ap.add_argument("--rtol32", type=float, default=1e-4)
    args = ap.parse_args()
    models = [m for m in args.models.split(",") if m and not (m == "gpt2" and args.gpt2 == "none")]
    unknown = [m for m in models if m not in (*MODELS, "gpt2")]
    if unknown:
        ap.error(f"--models must name models of reference_models.py or gpt2; got {','.join(unknown)}")
    for flag in ("batch", "gpt2_batch", "rounds"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be 1 or more; got {getattr(args, flag)}")
    if args.seq < 2:
        ap.error(f"--seq must be 2 or more (a next token to predict); got {args.seq}")
    if args.device not in ("cuda", "cpu"):
        ap.error(f"--device must be cuda or cpu; got {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"skipped: no CUDA device (torch {torch.__version__}); --device cpu runs the same "
              f"checks CPU against CPU")
        return 0
    device = torch.device(args.device)
    card = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(f"# gpu_check on {card}, torch {torch.__version__}"
          f"{', CUDA ' + str(torch.version.cuda) if device.type == 'cuda' else ''}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}; against the CPU; batch {args.batch} (GPT-2: "
          f"{args.gpt2} {args.gpt2_batch} x {args.seq} tokens); {args.rounds} timed rounds")
    print(f"# err: max ||g - g_cpu|| / ||g_cpu|| over parameters and 2 private steps at sigma 0 "
          f"(tolerance {args.rtol64:g} in float64, {args.rtol32:g} in float32, TF32 off); "
          f"on device: p.grad on the parameter's device and dtype and the sampled batch on the "
          f"device; noise: drawn by the engine's generator for the device only; ms: float32 "
          f"steps, medians; x np = private / non-private\n")
    head = ("| model | params | f64 err | f32 err | on device | noise | np ms | private ms "
            "| x np |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    passed = True
    for name in models:
        line, ok = row(check(name, args, device), args)
        passed &= ok
        print(line, flush=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
