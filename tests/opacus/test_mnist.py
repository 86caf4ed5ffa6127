"""Port of Opacus's ``examples/mnist.py`` (Apache-2.0, Meta Platforms): only the import changed.

Stand-ins: ``datasets.MNIST`` -> learnable random 28x28 images (no torchvision, no download),
``pin_memory=False``; the command line sets CPU and a few epochs; argparse help texts dropped. ``-r 2`` runs twice, re-privatising the loader the
first run's ``make_private`` returned (``train_loader`` is reassigned inside the loop).
"""

import argparse
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim
from privgrad.opacus import PrivacyEngine  # was: from opacus import PrivacyEngine
from tqdm import tqdm

from tests.opacus.conftest import printed_epsilons, stand_in_images, trained

# Precomputed characteristics of the MNIST dataset
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


class SampleConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 8, 2, padding=3)
        self.conv2 = nn.Conv2d(16, 32, 4, 2)
        self.fc1 = nn.Linear(32 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        # x of shape [B, 1, 28, 28]
        x = F.relu(self.conv1(x))  # -> [B, 16, 14, 14]
        x = F.max_pool2d(x, 2, 1)  # -> [B, 16, 13, 13]
        x = F.relu(self.conv2(x))  # -> [B, 32, 5, 5]
        x = F.max_pool2d(x, 2, 1)  # -> [B, 32, 4, 4]
        x = x.view(-1, 32 * 4 * 4)  # -> [B, 512]
        x = F.relu(self.fc1(x))  # -> [B, 32]
        x = self.fc2(x)  # -> [B, 10]
        return x

    def name(self):
        return "SampleConvNet"


def train(args, model, device, train_loader, optimizer, privacy_engine, epoch):
    model.train()
    criterion = nn.CrossEntropyLoss()
    losses = []
    for _batch_idx, (data, target) in enumerate(tqdm(train_loader)):
        data, target = data.to(device), target.to(device)
        optimizer.zero_grad()
        output = model(data)
        loss = criterion(output, target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    if not args.disable_dp:
        epsilon = privacy_engine.accountant.get_epsilon(delta=args.delta)
        print(
            f"Train Epoch: {epoch} \t"
            f"Loss: {np.mean(losses):.6f} "
            f"(ε = {epsilon:.2f}, δ = {args.delta})"
        )
    else:
        print(f"Train Epoch: {epoch} \t Loss: {np.mean(losses):.6f}")


def test(model, device, test_loader):
    model.eval()
    criterion = nn.CrossEntropyLoss()
    test_loss = 0
    correct = 0
    with torch.no_grad():
        for data, target in tqdm(test_loader):
            data, target = data.to(device), target.to(device)
            output = model(data)
            test_loss += criterion(output, target).item()  # sum up batch loss
            pred = output.argmax(
                dim=1, keepdim=True
            )  # get the index of the max log-probability
            correct += pred.eq(target.view_as(pred)).sum().item()

    test_loss /= len(test_loader.dataset)

    print(
        "\nTest set: Average loss: {:.4f}, Accuracy: {}/{} ({:.2f}%)\n".format(
            test_loss,
            correct,
            len(test_loader.dataset),
            100.0 * correct / len(test_loader.dataset),
        )
    )
    return correct / len(test_loader.dataset)


test.__test__ = False  # (the script's evaluation function, not a pytest test)


def main():
    # Training settings
    parser = argparse.ArgumentParser(
        description="Opacus MNIST Example",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("-b", "--batch-size", type=int, default=64, metavar="B")
    parser.add_argument("--test-batch-size", type=int, default=1024, metavar="TB")
    parser.add_argument("-n", "--epochs", type=int, default=10, metavar="N")
    parser.add_argument("-r", "--n-runs", type=int, default=1, metavar="R")
    parser.add_argument("--lr", type=float, default=0.1, metavar="LR")
    parser.add_argument("--sigma", type=float, default=1.0, metavar="S")
    parser.add_argument("-c", "--max-per-sample-grad_norm", type=float, default=1.0, metavar="C")
    parser.add_argument("--delta", type=float, default=1e-5, metavar="D")
    parser.add_argument("--device", type=str, default="cuda")
    parser.add_argument("--save-model", action="store_true", default=False)
    parser.add_argument("--disable-dp", action="store_true", default=False)
    parser.add_argument("--secure-rng", action="store_true", default=False)
    parser.add_argument("--data-root", type=str, default="../mnist")
    args = parser.parse_args()
    device = torch.device(args.device)

    train_loader = torch.utils.data.DataLoader(
        stand_in_images(256, (1, 28, 28), seed=1),  # stand-in: datasets.MNIST(train=True)
        batch_size=args.batch_size,
        num_workers=0,
        pin_memory=False,  # stand-in: True (no accelerator here)
    )
    test_loader = torch.utils.data.DataLoader(
        stand_in_images(64, (1, 28, 28), seed=2),  # stand-in: datasets.MNIST(train=False)
        batch_size=args.test_batch_size,
        shuffle=True,
        num_workers=0,
        pin_memory=False,  # stand-in: True (no accelerator here)
    )
    run_results = []
    for _ in range(args.n_runs):
        model = SampleConvNet().to(device)

        optimizer = optim.SGD(model.parameters(), lr=args.lr, momentum=0)
        privacy_engine = None

        if not args.disable_dp:
            privacy_engine = PrivacyEngine(secure_mode=args.secure_rng)
            model, optimizer, train_loader = privacy_engine.make_private(
                module=model,
                optimizer=optimizer,
                data_loader=train_loader,
                noise_multiplier=args.sigma,
                max_grad_norm=args.max_per_sample_grad_norm,
            )

        for epoch in range(1, args.epochs + 1):
            train(args, model, device, train_loader, optimizer, privacy_engine, epoch)
        run_results.append(test(model, device, test_loader))

    if len(run_results) > 1:
        print(
            "Accuracy averaged over {} runs: {:.2f}% ± {:.2f}%".format(
                len(run_results), np.mean(run_results) * 100, np.std(run_results) * 100
            )
        )

    repro_str = (
        f"mnist_{args.lr}_{args.sigma}_"
        f"{args.max_per_sample_grad_norm}_{args.batch_size}_{args.epochs}"
    )
    torch.save(run_results, f"run_results_{repro_str}.pt")

    if args.save_model:
        torch.save(model.state_dict(), f"mnist_cnn_{repro_str}.pt")


# -- the checks --------------------------------------------------------------------------------
@pytest.mark.slow
def test_mnist_runs_twice_on_the_returned_loader(run_main, engines, tmp_path, capsys):
    engines.watch(sys.modules[__name__])
    run_main(sys.modules[__name__], ["--device", "cpu", "-n", "2", "-r", "2", "--save-model"])
    first, second = engines.built
    for engine in engines.built:  # 256 records, batch 64: q = 1/4, 4 steps an epoch, 2 epochs
        assert engine.privgrad_engine.steps == 8
        assert engine.accountant.history == [(1.0, 0.25, 8)]
        assert trained(engine)
    # the second run sampled the same data set through the loader the first run returned
    assert second.privgrad_engine.settings.expected_batch_size == 64
    printed = printed_epsilons(capsys.readouterr().out)
    assert len(printed) == 4 and printed[0] < printed[1]
    assert printed[-1] == pytest.approx(second.get_epsilon(1e-5), abs=0.01)
    results = torch.load(tmp_path / "run_results_mnist_0.1_1.0_1.0_64_2.pt")
    assert len(results) == 2 and all(0.0 <= r <= 1.0 for r in results)
    saved = torch.load(tmp_path / "mnist_cnn_mnist_0.1_1.0_1.0_64_2.pt")
    assert set(saved) == {n for n, _ in SampleConvNet().named_parameters()}  # no _module. prefix
    assert all(torch.equal(v, second.privgrad_engine.module.state_dict()[k])
               for k, v in saved.items())
