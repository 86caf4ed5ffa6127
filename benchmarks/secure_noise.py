"""What secure mode costs: the secure noise (CSPRNG + lattice Gaussian) against PyTorch's
generator, and against a whole private training step, for MLPs of about 1M and 10M parameters.

    python benchmarks/secure_noise.py                 # on the GPU if there is one, else the CPU
    python benchmarks/secure_noise.py --device cpu --batch-size 64

Prints one table from one run; every time is the median of --repeats steps after a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privgrad import PrivacyEngine
from privgrad.privatize.noise import TorchGaussian
from privgrad.privatize.secure import SecureGaussian, SecureRandom

D_IN, CLASSES = 1024, 10


def mlp(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(D_IN, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, width), nn.ReLU(), nn.Linear(width, CLASSES))


def timed(fn, device, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls, after two warm-up calls."""
    out = []
    for i in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            out.append(time.perf_counter() - t)
    return statistics.median(out)


def private_step_time(width: int, device, batch: int, secure: bool, repeats: int) -> float:
    torch.manual_seed(0)
    model = mlp(width).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    n = batch * 8
    data = TensorDataset(torch.randn(n, D_IN), torch.randint(0, CLASSES, (n,)))
    engine = PrivacyEngine(accountant="rdp", secure_mode=secure)
    _, _, dl = engine.make_private(module=model, optimizer=optimizer,
                                   data_loader=DataLoader(data, batch_size=batch),
                                   noise_multiplier=1.0, max_grad_norm=1.0)
    x, y = (t.to(device) for t in next(iter(dl)))  # one sampled batch, reused: data loading aside

    def step():
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    return timed(step, device, repeats)


def noise_time(source, params, device, repeats: int) -> float:
    totals = [torch.zeros_like(p) for p in params]
    return timed(lambda: [source.add_noise(t, 1.0) for t in totals], device, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--widths", type=int, nargs="+", default=[500, 2000])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 avoids barrier stalls on a busy machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}, torch threads: {torch.get_num_threads()}, batch size: "
          f"{args.batch_size}")
    print(f"{'params':>8} {'step':>9} {'secure step':>12} {'torch noise':>12} "
          f"{'secure noise':>13} {'CSPRNG':>9} {'secure noise / step':>20} "
          f"{'secure step / step':>19}")
    random = SecureRandom()
    for width in args.widths:
        params = list(mlp(width).to(device).parameters())
        count = sum(p.numel() for p in params)
        step = private_step_time(width, device, args.batch_size, False, args.repeats)
        secure_step = private_step_time(width, device, args.batch_size, True, args.repeats)
        plain = noise_time(TorchGaussian(), params, device, args.repeats)
        hardened = noise_time(SecureGaussian(random), params, device, args.repeats)
        words = timed(lambda: random.words(2 * count), torch.device("cpu"), args.repeats)
        print(f"{count / 1e6:7.1f}M {step * 1e3:7.1f}ms {secure_step * 1e3:10.1f}ms "
              f"{plain * 1e3:10.1f}ms {hardened * 1e3:11.1f}ms {words * 1e3:7.1f}ms "
              f"{hardened / step:19.1%} {secure_step / step:18.2f}x")


if __name__ == "__main__":
    main()
