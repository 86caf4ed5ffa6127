"""Milliseconds for a Linear layer's ghost norm with the Gram products whole and in halves, and
for a private transformer step over long sequences with either.

    python benchmarks/ghost_norms.py              # shapes (batch, positions, in, out) below
    python benchmarks/ghost_norms.py --step 512   # also a private step, sequences of 512

From ``privgrad.layers.linear.GRAM_HALVES_MIN`` positions the two symmetric Gram matrices of a
ghost norm are formed as two diagonal blocks and one off-diagonal block of the halves (3/4 of
the multiply-adds). Both variants run in this one process, interleaved: whole matrices are
obtained by raising the threshold above every length.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from torch import nn

import privgrad.layers.linear as linear

SHAPES = [(64, 128, 256, 768), (32, 256, 256, 1024), (32, 256, 768, 768), (16, 256, 768, 3072),
          (8, 512, 768, 3072), (16, 512, 256, 1024), (4, 1024, 768, 3072)]


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def compare(fn, repeats: int) -> tuple[float, float]:
    """Median ms of ``fn`` with whole Gram matrices and in halves, alternating."""
    default, ms = linear.GRAM_HALVES_MIN, {"whole": [], "halves": []}
    try:
        for _ in range(repeats):
            for kind in ms:
                linear.GRAM_HALVES_MIN = sys.maxsize if kind == "whole" else default
                ms[kind] += timed(fn, 1)
    finally:
        linear.GRAM_HALVES_MIN = default
    return statistics.median(ms["whole"]) * 1e3, statistics.median(ms["halves"]) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--step", type=int, metavar="SEQ",
                    help="also time a private step of the benchmark transformer at this length")
    ap.add_argument("--batch", type=int, default=4, help="batch size of --step")
    ap.add_argument("--width", type=int, default=768,
                    help="model width of --step (BERT-base's 768: its Linear layers take the "
                         "ghost norm at 512 positions; at the benchmark's 256 they materialise)")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error(f"--repeats must be 1 or more; got {args.repeats}")
    if args.step is not None and args.step < 2:
        ap.error(f"--step must be a sequence length of 2 or more; got {args.step}")
    if args.batch < 1:
        ap.error(f"--batch must be 1 or more; got {args.batch}")
    if args.width < 4 or args.width % 4:
        ap.error(f"--width must be a multiple of the 4 heads; got {args.width}")
    print(f"# ghost norms, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads), GRAM_HALVES_MIN = "
          f"{linear.GRAM_HALVES_MIN}; median ms of {args.repeats}, interleaved\n")
    print("| batch | positions | in | out | whole | halves | halves / whole |")
    print("|---|---|---|---|---|---|---|")
    torch.manual_seed(0)
    for b, t, d, p in SHAPES:
        a, g = torch.randn(b, t, d), torch.randn(b, t, p)
        whole, halves = compare(lambda: linear.linear_ghost_norm_sq(a, g, torch.float32),
                                args.repeats)
        print(f"| {b} | {t} | {d} | {p} | {whole:.1f} | {halves:.1f} | {halves / whole:.2f} |")
    if args.step is None:
        return
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from step_time import Transformer, drawn_batch  # noqa: E402 - the benchmark's own model

    from privgrad import PrivacyEngine

    model = Transformer(seq=args.step, d=args.width)
    x = torch.randint(0, 10_000, (args.batch, args.step))
    y = torch.randint(0, 2, (args.batch,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y),
                                         batch_size=args.batch)
    engine = PrivacyEngine()
    engine.make_private(module=model, optimizer=optimizer, data_loader=loader,
                        noise_multiplier=1.0, max_grad_norm=1.0)
    criterion = nn.CrossEntropyLoss()

    def step():
        optimizer.zero_grad(set_to_none=True)
        drawn_batch(engine, args.batch)
        criterion(model(x), y).backward()
        optimizer.step()

    import privgrad.engine.batch as batch

    seen, init = [], batch.BackwardBatch.__init__

    def recording(self, *a, **k):  # the methods the cost model chose (for the printout)
        init(self, *a, **k)
        seen.append(dict(self.methods))

    batch.BackwardBatch.__init__ = recording
    methods, default = {}, linear.GRAM_HALVES_MIN
    try:
        for kind, threshold in (("whole", sys.maxsize), ("halves", default)):
            linear.GRAM_HALVES_MIN = threshold
            step()
            methods[kind] = sorted(seen[-1].items())
    finally:
        linear.GRAM_HALVES_MIN = default
        batch.BackwardBatch.__init__ = init
    whole, halves = compare(step, args.repeats)
    print(f"\nprivate step, benchmark transformer of width {args.width}, batch {args.batch}, "
          f"sequence {args.step}: whole {whole:.0f} ms, halves {halves:.0f} ms "
          f"({halves / whole:.2f})")
    for kind, chosen in methods.items():
        print(f"- {kind}: " + ", ".join(f"{path} {m}" for path, m in chosen))


if __name__ == "__main__":
    main()
