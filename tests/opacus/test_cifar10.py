"""Port of Opacus's ``examples/cifar10.py`` (Apache-2.0, Meta Platforms): only the imports
changed.

Stand-ins: ``CIFAR10`` -> learnable random 3x32x32 images and the torchvision transforms
dropped (no torchvision, no download), ``pin_memory=False``, no ``logging.basicConfig`` (it
would configure the test process's root logger), argparse help texts dropped; the
command line sets CPU, small batches and two epochs. The multi-GPU branch (``DPDDP``) needs CUDA
in this script; ``DPDDP`` itself runs in the DDP tutorial's port. ``grad_sample_mode="no_op"``
(per-sample gradients set by the script in ``p.grad_sample``) is refused by
``privgrad.opacus``: privgrad computes the per-sample gradients itself.
"""

import argparse
import logging
import os
import shutil
import sys
from datetime import datetime, timedelta

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.optim as optim
import torch.utils.data
import torch.utils.data.distributed
from privgrad.opacus import PrivacyEngine  # was: from opacus import ...
from privgrad.opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
from privgrad.opacus.grad_sample.functorch import make_functional
from torch.func import grad_and_value, vmap
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from privgrad.errors import ConfigError
from tests.opacus.conftest import printed_epsilons, stand_in_images, trained

# stand-in: logging.basicConfig(format=..., datefmt=..., stream=sys.stdout) would configure
# the root logger of the whole test process when this module is collected
logger = logging.getLogger("ddp")
logger.setLevel(level=logging.INFO)


def setup(args):
    if not torch.cuda.is_available():
        raise NotImplementedError(
            "DistributedDataParallel device_ids and output_device arguments \
            only work with single-device GPU modules"
        )

    if sys.platform == "win32":
        raise NotImplementedError("Windows version of multi-GPU is not supported yet.")

    # Initialize the process group on a Slurm cluster
    if os.environ.get("SLURM_NTASKS") is not None:
        rank = int(os.environ.get("SLURM_PROCID"))
        local_rank = int(os.environ.get("SLURM_LOCALID"))
        world_size = int(os.environ.get("SLURM_NTASKS"))
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = "7440"

        torch.distributed.init_process_group(
            args.dist_backend, rank=rank, world_size=world_size
        )

        logger.debug(
            f"Setup on Slurm: rank={rank}, local_rank={local_rank}, world_size={world_size}"
        )

        return (rank, local_rank, world_size)

    # Initialize the process group through the environment variables
    elif args.local_rank >= 0:
        torch.distributed.init_process_group(
            init_method="env://",
            backend=args.dist_backend,
        )
        rank = torch.distributed.get_rank()
        local_rank = args.local_rank
        world_size = torch.distributed.get_world_size()

        logger.debug(
            f"Setup with 'env://': rank={rank}, local_rank={local_rank}, world_size={world_size}"
        )

        return (rank, local_rank, world_size)

    else:
        logger.debug("Running on a single GPU.")
        return (0, 0, 1)


def cleanup():
    torch.distributed.destroy_process_group()


def convnet(num_classes):
    return nn.Sequential(
        nn.Conv2d(3, 32, kernel_size=3, stride=1, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Conv2d(32, 64, kernel_size=3, stride=1, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Conv2d(64, 64, kernel_size=3, stride=1, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Conv2d(64, 128, kernel_size=3, stride=1, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d((1, 1)),
        nn.Flatten(start_dim=1, end_dim=-1),
        nn.Linear(128, num_classes, bias=True),
    )


def save_checkpoint(state, is_best, filename="checkpoint.tar"):
    torch.save(state, filename)
    if is_best:
        shutil.copyfile(filename, "model_best.pth.tar")


def accuracy(preds, labels):
    return (preds == labels).mean()


def train(args, model, train_loader, optimizer, privacy_engine, epoch, device):
    start_time = datetime.now()

    model.train()
    criterion = nn.CrossEntropyLoss()

    losses = []
    top1_acc = []

    if args.grad_sample_mode == "no_op":
        # Functorch prepare
        fmodel, _fparams = make_functional(model)

        def compute_loss_stateless_model(params, sample, target):
            batch = sample.unsqueeze(0)
            targets = target.unsqueeze(0)

            predictions = fmodel(params, batch)
            loss = criterion(predictions, targets)
            return loss

        ft_compute_grad = grad_and_value(compute_loss_stateless_model)
        ft_compute_sample_grad = vmap(ft_compute_grad, in_dims=(None, 0, 0))
        # Using model.parameters() instead of fparams
        # as fparams seems to not point to the dynamically updated parameters
        params = list(model.parameters())

    for i, (images, target) in enumerate(tqdm(train_loader)):
        images = images.to(device)
        target = target.to(device)

        # compute output
        output = model(images)

        if args.grad_sample_mode == "no_op":
            per_sample_grads, per_sample_losses = ft_compute_sample_grad(
                params, images, target
            )
            per_sample_grads = [g.detach() for g in per_sample_grads]
            loss = torch.mean(per_sample_losses)
            for p, g in zip(params, per_sample_grads):
                p.grad_sample = g
        else:
            loss = criterion(output, target)
            preds = np.argmax(output.detach().cpu().numpy(), axis=1)
            labels = target.detach().cpu().numpy()

            # measure accuracy and record loss
            acc1 = accuracy(preds, labels)
            top1_acc.append(acc1)

            # compute gradient and do SGD step
            loss.backward()

        losses.append(loss.item())

        # make sure we take a step after processing the last mini-batch in the
        # epoch to ensure we start the next epoch with a clean state
        optimizer.step()
        optimizer.zero_grad()

        if i % args.print_freq == 0:
            if not args.disable_dp:
                epsilon = privacy_engine.accountant.get_epsilon(delta=args.delta)
                print(
                    f"\tTrain Epoch: {epoch} \t"
                    f"Loss: {np.mean(losses):.6f} "
                    f"Acc@1: {np.mean(top1_acc):.6f} "
                    f"(ε = {epsilon:.2f}, δ = {args.delta})"
                )
            else:
                print(
                    f"\tTrain Epoch: {epoch} \t"
                    f"Loss: {np.mean(losses):.6f} "
                    f"Acc@1: {np.mean(top1_acc):.6f} "
                )
    train_duration = datetime.now() - start_time
    return train_duration


def test(args, model, test_loader, device):
    model.eval()
    criterion = nn.CrossEntropyLoss()
    losses = []
    top1_acc = []

    with torch.no_grad():
        for images, target in tqdm(test_loader):
            images = images.to(device)
            target = target.to(device)

            output = model(images)
            loss = criterion(output, target)
            preds = np.argmax(output.detach().cpu().numpy(), axis=1)
            labels = target.detach().cpu().numpy()
            acc1 = accuracy(preds, labels)

            losses.append(loss.item())
            top1_acc.append(acc1)

    top1_avg = np.mean(top1_acc)

    print(f"\tTest set:" f"Loss: {np.mean(losses):.6f} " f"Acc@1: {top1_avg :.6f} ")
    return np.mean(top1_acc)


test.__test__ = False  # (the script's evaluation function, not a pytest test)


# flake8: noqa: C901
def main():
    args = parse_args()

    if args.debug >= 1:
        logger.setLevel(level=logging.DEBUG)

    # Sets `world_size = 1` if you run on a single GPU with `args.local_rank = -1`
    if args.local_rank != -1 or args.device != "cpu":
        rank, local_rank, world_size = setup(args)
        device = local_rank
    else:
        device = "cpu"
        rank = 0
        world_size = 1

    if args.secure_rng:
        try:
            import torchcsprng as prng
        except ImportError as e:
            msg = (
                "To use secure RNG, you must install the torchcsprng package! "
                "Check out the instructions here: https://github.com/pytorch/csprng#installation"
            )
            raise ImportError(msg) from e

        generator = prng.create_random_device_generator("/dev/urandom")

    else:
        generator = None

    # stand-in: the torchvision augmentations and normalisation

    train_dataset = stand_in_images(256, (3, 32, 32), seed=1)  # stand-in: CIFAR10(train=True)

    train_loader = torch.utils.data.DataLoader(
        train_dataset,
        batch_size=args.batch_size,
        generator=generator,
        num_workers=args.workers,
        pin_memory=False,  # stand-in: True (no accelerator here)
    )

    test_dataset = stand_in_images(64, (3, 32, 32), seed=2)  # stand-in: CIFAR10(train=False)
    test_loader = torch.utils.data.DataLoader(
        test_dataset,
        batch_size=args.batch_size_test,
        shuffle=False,
        num_workers=args.workers,
    )

    best_acc1 = 0

    model = convnet(num_classes=10)
    model = model.to(device)

    # Use the right distributed module wrapper if distributed training is enabled
    if world_size > 1:
        if not args.disable_dp:
            if args.clip_per_layer:
                model = DDP(model, device_ids=[device])
            else:
                model = DPDDP(model)
        else:
            model = DDP(model, device_ids=[device])

    if args.optim == "SGD":
        optimizer = optim.SGD(
            model.parameters(),
            lr=args.lr,
            momentum=args.momentum,
            weight_decay=args.weight_decay,
        )
    elif args.optim == "RMSprop":
        optimizer = optim.RMSprop(model.parameters(), lr=args.lr)
    elif args.optim == "Adam":
        optimizer = optim.Adam(model.parameters(), lr=args.lr)
    else:
        raise NotImplementedError("Optimizer not recognized. Please check spelling")

    privacy_engine = None
    if not args.disable_dp:
        if args.clip_per_layer:
            # Each layer has the same clipping threshold. The total grad norm is still bounded by `args.max_per_sample_grad_norm`.
            n_layers = len(
                [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            )
            max_grad_norm = [
                args.max_per_sample_grad_norm / np.sqrt(n_layers)
            ] * n_layers
        else:
            max_grad_norm = args.max_per_sample_grad_norm

        privacy_engine = PrivacyEngine(
            secure_mode=args.secure_rng,
        )
        clipping = "per_layer" if args.clip_per_layer else "flat"
        model, optimizer, train_loader = privacy_engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=train_loader,
            noise_multiplier=args.sigma,
            max_grad_norm=max_grad_norm,
            clipping=clipping,
            grad_sample_mode=args.grad_sample_mode,
        )

    # Store some logs
    accuracy_per_epoch = []
    time_per_epoch = []

    for epoch in range(args.start_epoch, args.epochs + 1):
        if args.lr_schedule == "cos":
            lr = args.lr * 0.5 * (1 + np.cos(np.pi * epoch / (args.epochs + 1)))
            for param_group in optimizer.param_groups:
                param_group["lr"] = lr

        train_duration = train(
            args, model, train_loader, optimizer, privacy_engine, epoch, device
        )
        top1_acc = test(args, model, test_loader, device)

        # remember best acc@1 and save checkpoint
        is_best = top1_acc > best_acc1
        best_acc1 = max(top1_acc, best_acc1)

        time_per_epoch.append(train_duration)
        accuracy_per_epoch.append(float(top1_acc))

        save_checkpoint(
            {
                "epoch": epoch + 1,
                "arch": "Convnet",
                "state_dict": model.state_dict(),
                "best_acc1": best_acc1,
                "optimizer": optimizer.state_dict(),
            },
            is_best,
            filename=args.checkpoint_file + ".tar",
        )

    if rank == 0:
        time_per_epoch_seconds = [t.total_seconds() for t in time_per_epoch]
        avg_time_per_epoch = sum(time_per_epoch_seconds) / len(time_per_epoch_seconds)
        metrics = {
            "accuracy": best_acc1,
            "accuracy_per_epoch": accuracy_per_epoch,
            "avg_time_per_epoch_str": str(timedelta(seconds=int(avg_time_per_epoch))),
            "time_per_epoch": time_per_epoch_seconds,
        }

        logger.info(
            "\nNote:\n- 'total_time' includes the data loading time, training time and testing time.\n- 'time_per_epoch' measures the training time only.\n"
        )
        logger.info(metrics)

    if world_size > 1:
        cleanup()


def parse_args():
    parser = argparse.ArgumentParser(description="PyTorch CIFAR10 DP Training")
    parser.add_argument("--grad_sample_mode", type=str, default="hooks")
    parser.add_argument("-j", "--workers", default=2, type=int, metavar="N")
    parser.add_argument("--epochs", default=90, type=int, metavar="N")
    parser.add_argument("--start-epoch", default=1, type=int, metavar="N")
    parser.add_argument("-b", "--batch-size-test", default=256, type=int, metavar="N")
    parser.add_argument("--batch-size", default=2000, type=int, metavar="N")
    parser.add_argument("--lr", "--learning-rate", default=0.1, type=float, metavar="LR",
                        dest="lr")
    parser.add_argument("--momentum", default=0.9, type=float, metavar="M", help="SGD momentum")
    parser.add_argument("--wd", "--weight-decay", default=0, type=float, metavar="W",
                        dest="weight_decay")
    parser.add_argument("-p", "--print-freq", default=10, type=int, metavar="N")
    parser.add_argument("--resume", default="", type=str, metavar="PATH")
    parser.add_argument("-e", "--evaluate", dest="evaluate", action="store_true")
    parser.add_argument("--seed", default=None, type=int)
    parser.add_argument("--sigma", type=float, default=1.5, metavar="S")
    parser.add_argument("-c", "--max-per-sample-grad_norm", type=float, default=10.0, metavar="C")
    parser.add_argument("--disable-dp", action="store_true", default=False)
    parser.add_argument("--secure-rng", action="store_true", default=False)
    parser.add_argument("--delta", type=float, default=1e-5, metavar="D")
    parser.add_argument("--checkpoint-file", type=str, default="checkpoint")
    parser.add_argument("--data-root", type=str, default="../cifar10")
    parser.add_argument("--log-dir", type=str, default="/tmp/stat/tensorboard")
    parser.add_argument("--optim", type=str, default="SGD")
    parser.add_argument("--lr-schedule", type=str, choices=["constant", "cos"], default="cos")
    parser.add_argument("--device", type=str, default="cpu")
    parser.add_argument("--local_rank", type=int, default=-1)
    parser.add_argument("--dist_backend", type=str, default="gloo")
    parser.add_argument("--clip_per_layer", action="store_true", default=False)
    parser.add_argument("--debug", type=int, default=0)

    return parser.parse_args()


# -- the checks --------------------------------------------------------------------------------
SMALL = ["--epochs", "2", "--batch-size", "64", "-b", "64", "-j", "0", "-p", "2"]


@pytest.mark.slow
@pytest.mark.parametrize("flags, bound", [
    ([], 10.0),                                                     # hooks, flat, SGD + cosine
    (["--clip_per_layer", "--optim", "Adam", "--lr-schedule", "constant"], [10 / 10**0.5] * 10),
])
def test_cifar10_trains_as_configured(run_main, engines, tmp_path, capsys, flags, bound):
    engines.watch(sys.modules[__name__])
    run_main(sys.modules[__name__], SMALL + flags)
    (engine,) = engines.built
    optimizer = engine.privgrad_engine.optimizer  # the user's optimizer, stepped directly
    assert engine.privgrad_engine.steps == 8 and trained(engine)  # q = 64/256: 4 steps, 2 epochs
    assert engine.privgrad_engine.settings.max_grad_norm == pytest.approx(
        tuple(bound) if isinstance(bound, list) else bound)
    lr = optimizer.param_groups[0]["lr"]  # the cosine schedule wrote through the returned view
    assert lr == pytest.approx(0.1 * 0.5 * (1 + np.cos(np.pi * 2 / 3)) if not flags else 0.1)
    epsilons = printed_epsilons(capsys.readouterr().out)
    assert len(epsilons) == 4 and 0 < epsilons[0] < epsilons[-1] < float("inf")
    saved = torch.load(tmp_path / "checkpoint.tar", weights_only=False)
    assert saved["optimizer"]["param_groups"][0]["lr"] == pytest.approx(lr)
    assert set(saved["state_dict"]) == set(convnet(10).state_dict())  # no _module. prefix


def test_cifar10_no_op_mode_is_refused_with_the_fix(run_main):
    with pytest.raises(ConfigError, match=r"grad_sample_mode='no_op'.*loss.backward\(\)"):
        run_main(sys.modules[__name__], SMALL + ["--grad_sample_mode", "no_op"])
