"""The port of Opacus's ``ddp_tutorial.ipynb`` (``scripts/ddp_demo.py``,
``ddp_data_loader_demo.py``, ``ddp_sync_demo.py``: the three files its cells write), run in
two processes on gloo, as the tutorial runs them (``torch.multiprocessing.spawn``).

Each rank runs the three sections in turn (each on its own port) and saves what the checks
need; the tutorial's code is not changed for that: the rank wraps the sections'
``init_training`` to keep the objects it returns, and listens to their loggers.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _keep(module, name: str, box: dict) -> None:
    """Wrap ``module.name`` so that what it returns is also kept in ``box[name]``, and its
    model's parameters as they were then in ``box["initial"]``."""
    original = getattr(module, name)

    def kept(*args):
        box[name] = original(*args)
        box["initial"] = [p.detach().clone() for p in box[name][0].parameters()]
        return box[name]

    setattr(module, name, kept)


def _listen(logger: logging.Logger) -> list[str]:
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger.addHandler(handler)
    return messages


def run_rank(rank: int, world_size: int, ports: list[int], out: str) -> None:
    """One rank: the tutorial's three sections, then its results to ``out/rank{rank}.pt``."""
    warnings.simplefilter("error")
    # section 3's torch.tensor(target) on a tensor (the tutorial runs with -W ignore)
    warnings.filterwarnings("ignore", "To copy construct from a tensor", UserWarning)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    from tests.opacus.scripts import ddp_data_loader_demo, ddp_demo, ddp_sync_demo

    results: dict = {}
    box: dict = {}
    # -- section 1: private training with DPDDP and make_private
    os.environ["PRIVGRAD_TEST_MASTER_PORT"] = str(ports[0])
    torch.manual_seed(rank)  # the ranks start from different models: DPDDP must align them
    _keep(ddp_demo, "init_training", box)
    messages = _listen(ddp_demo.logger)
    ddp_demo.launch(rank, world_size, ddp_demo.EPOCHS)
    model, optimizer, _, engine = box["init_training"]
    results["demo"] = {
        "params": [p.detach().clone() for p in model.parameters()],
        "history": engine.accountant.history, "epsilon": engine.get_epsilon(1e-5),
        "data_parallel": engine.privgrad_engine.data_parallel,
        "expected_batch_size": optimizer.expected_batch_size, "messages": messages,
        "trained": all(not torch.equal(a, b) for a, b in zip(box["initial"], model.parameters()))}
    # -- section 2: the distributed DPDataLoader
    os.environ["PRIVGRAD_TEST_MASTER_PORT"] = str(ports[1])
    messages = _listen(ddp_data_loader_demo.logger)
    ddp_data_loader_demo.init_data(rank, world_size)
    dist.destroy_process_group()  # (the tutorial's process ends here instead)
    results["loader"] = {"messages": messages}
    # -- section 3: hand-assembled GradSampleModule, DPDDP and DistributedDPOptimizer
    os.environ["PRIVGRAD_TEST_MASTER_PORT"] = str(ports[2])
    torch.manual_seed(100 + rank)
    _keep(ddp_sync_demo, "init_training", box)
    ddp_sync_demo.launch(rank, world_size)
    model, optimizer, _ = box["init_training"]
    params = list(model.parameters())
    results["sync"] = {
        "before": torch.cat([p.grad_sample.sum(0).view(-1) for p in params])
        / optimizer.expected_batch_size,
        "after": torch.cat([p.grad.view(-1) for p in params]),
        "params": [p.detach().clone() for p in params]}
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    context = mp.spawn(run_rank, args=(WORLD, [_free_port() for _ in range(3)], str(out)),
                       nprocs=WORLD, join=False)
    deadline = time.monotonic() + 300
    while not context.join(timeout=2):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            raise AssertionError("the DDP tutorial's ranks did not finish in 300 s")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_section1_ranks_train_one_model_with_one_accountant(ranks):
    first, second = (r["demo"] for r in ranks)
    assert first["data_parallel"] and second["data_parallel"]
    assert first["trained"] and second["trained"]
    for a, b in zip(first["params"], second["params"]):
        assert torch.equal(a, b)  # DPDDP aligned the models; every step kept them in sync
    # 400 images, batch 200: q = 1/2, 2 steps an epoch, 2 epochs; one history for the job
    assert first["history"] == second["history"] == [(1.0, 0.5, 4)]
    assert first["epsilon"] == second["epsilon"] < float("inf")
    # Opacus's per-process expected batch size: the job's 200 over 2 processes
    assert first["expected_batch_size"] == second["expected_batch_size"] == 100
    assert "(rank 1) Average batch size per GPU: 100" in second["messages"]


def test_section2_the_private_loader_splits_one_sample(ranks):
    messages = ranks[0]["loader"]["messages"]
    (private,) = [m for m in messages if "Distributed, private data loader" in m]
    assert "#data points: 200," in private and "sample_rate: 0.160000" in private
    assert "#batches: 6," in private  # round(1 / q) steps
    assert ranks[1]["loader"]["messages"] == []  # the tutorial logs on rank 0 only


def test_section3_the_distributed_optimizer_releases_the_mean_of_the_ranks(ranks):
    first, second = (r["sync"] for r in ranks)
    # sigma = 0 and C = 100 (nothing clipped): each rank gets the clipped sums of both ranks
    # over the job's expected batch size, i.e. the mean of the ranks' own normalised sums
    torch.testing.assert_close(first["after"], second["after"], rtol=0, atol=0)
    torch.testing.assert_close(first["after"], (first["before"] + second["before"]) / 2)
    for a, b in zip(first["params"], second["params"]):
        assert torch.equal(a, b)
