"""Start a small gloo job on loopback (one Python process per rank) and collect its results.

Each rank runs ``python -m tests.distributed.workers SCENARIO`` with warnings as errors, one
thread, a file-based rendezvous (no port to collide with other jobs on the machine) and gloo on
the loopback interface. The launch is bounded: a job that outlives ``timeout`` is killed, and its
ranks' output is shown in the failure.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def launch(scenario: str, world_size: int, workdir: Path, timeout: float = 150.0,
           module: str = "tests.distributed.workers") -> list[dict]:
    """Run ``scenario`` of ``module`` on ``world_size`` ranks; return each rank's saved
    results, by rank."""
    workdir.mkdir(parents=True, exist_ok=True)
    store = workdir / "store"  # each phase of the scenario uses store.<k>
    env = {**os.environ, "WORLD_SIZE": str(world_size), "PRIVGRAD_TEST_STORE": str(store),
           "PRIVGRAD_TEST_OUT": str(workdir), "GLOO_SOCKET_IFNAME": "lo",
           "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)]))}
    procs, logs = [], []
    for rank in range(world_size):
        log = open(workdir / f"rank{rank}.log", "w+")
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, "-W", "error", "-m", module, scenario],
            cwd=ROOT, env={**env, "RANK": str(rank)}, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    failed = [r for r, p in enumerate(procs) if p.returncode != 0]
    if failed:
        text = ""
        for r, log in enumerate(logs):
            log.seek(0)
            text += f"\n--- rank {r} (exit {procs[r].returncode}) ---\n{log.read()[-4000:]}"
        raise AssertionError(f"{scenario} on {world_size} ranks failed (ranks {failed}, timeout "
                             f"{timeout:.0f}s):{text}")
    for log in logs:
        log.close()
    return [torch.load(workdir / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
