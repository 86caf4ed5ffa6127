"""Step times measured in one process, the variants interleaved step by step.

``step_time.py --in-process`` builds each model once per variant (non-private, floor, privgrad and
Opacus's fastest mode), warms each up, then runs ``R`` rounds; a round takes one timed step of
every variant, in an order rotated by one each round (so no variant always follows the same
one). Each step of one variant is thus a few hundred milliseconds at most from a step of every
other: drift of a shared machine's speed hits all of them alike, and the per-round ratios
(privgrad / floor, privgrad / non-private, privgrad / Opacus) are far steadier than ratios of
runs made minutes apart. What the fresh-process mode removes (allocator and thread-pool state
carried over from one variant to the next) is here shared by all variants instead.

Opacus's fastest mode is chosen per model and batch by one probe: each mode allowed by
``--variants`` and ``--max-psg-gb`` is built, stepped once to warm up and once timed; the fastest
joins the rotation and the others are dropped (their probe times are in the notes).

``gpu_check.py`` times its private and non-private steps with ``interleave`` too.
"""

from __future__ import annotations

import gc
import statistics
import time
import traceback
from collections.abc import Callable

import torch
from reference_models import opacus_skip, prepare

#: the rotation's columns: the name in the table, the variant of ``reference_models.prepare``
ROTATION = (("np", "nonprivate"), ("floor", "floor"), ("privgrad", "privgrad"))
WARMUP = 2  # steps per variant before timing (privgrad's first step runs its self-check)


def timed(step: Callable[[], None], device: torch.device) -> float:
    """Milliseconds of one ``step()`` (on CUDA, from an idle device to the step's end)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    step()
    sync()
    return (time.perf_counter() - t0) * 1e3


def interleave(steps: dict[str, Callable[[], None]], rounds: int,
               device: torch.device | None = None, warmup: int = WARMUP) -> dict[str, list[float]]:
    """``{name: [ms of round 0, round 1, ...]}``: ``warmup`` untimed steps of each, then
    ``rounds`` rounds of one timed step of each, the order rotated by one every round."""
    device = device or torch.device("cpu")
    names = list(steps)
    for name in names:
        for _ in range(warmup):
            steps[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(timed(steps[name], device))
    return times


def ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median over rounds of ``num``'s step time over ``den``'s in the same round."""
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def failure(e: BaseException) -> str:
    """One line for a table's notes: the exception and where it came from."""
    where = traceback.extract_tb(e.__traceback__)[-1]
    return f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''} ({where.name})"


def fastest_opacus(name: str, batch: int, variants: list[str], max_gb: float) -> tuple[str | None, object, dict]:
    """Opacus's fastest mode on this model and batch: ``(variant, prepared, probes)``, where
    ``probes`` maps every candidate to its probe ms or the reason it did not run (``variant``
    is ``None`` if none ran)."""
    try:
        import opacus  # noqa: F401
    except ImportError:
        return None, None, {"opacus": "not installed"}
    best, best_ms, probes = None, float("inf"), {}
    for variant in (v for v in variants if v.startswith("opacus-")):
        skip = opacus_skip(name, batch, variant, max_gb)
        if skip:
            probes[variant] = f"skip: {skip}"
            continue
        try:
            torch.manual_seed(0)
            prepared = prepare(name, batch, variant)
            prepared.step()
            ms = timed(prepared.step, torch.device("cpu"))
        except Exception as e:  # noqa: BLE001 - a mode that fails on a model is reported
            probes[variant] = f"fail: {failure(e)}"
            continue
        probes[variant] = ms
        if ms < best_ms:
            best, best_ms = (variant, prepared), ms
        del prepared
        gc.collect()
    return (*best, probes) if best else (None, None, probes)


def measure(name: str, batch: int, rounds: int, variants: list[str], max_gb: float) -> dict:
    """One row: every variant built once, interleaved for ``rounds`` rounds."""
    r = {"model": name, "batch": batch}
    steps = {}
    for column, variant in ROTATION:
        try:
            torch.manual_seed(0)
            steps[column] = prepare(name, batch, variant).step
        except Exception as e:  # noqa: BLE001 - the row says why
            r["error"] = f"{variant} could not be built: {failure(e)}"
            return r
    opacus, prepared, r["probes"] = fastest_opacus(name, batch, variants, max_gb)
    if opacus is not None:
        r["opacus_mode"] = opacus.removeprefix("opacus-")
        steps["opacus"] = prepared.step
    try:
        times = interleave(steps, rounds)
    except Exception as e:  # noqa: BLE001 - the row says why
        r["error"] = f"a step failed: {failure(e)}"
        return r
    r["ms"] = {k: statistics.median(v) for k, v in times.items()}
    r["x"] = {k: ratio(times, "privgrad", k) for k in times if k != "privgrad"}
    r["x_floor_quartiles"] = quartiles([a / b for a, b in zip(times["privgrad"], times["floor"])])
    r["overhead_ms"] = statistics.median(a - b for a, b in zip(times["privgrad"], times["floor"]))
    r["rounds"] = times
    return r


HEAD = ("| model | B | np | floor | privgrad | opacus (mode) | x np | x floor | x opacus "
        "| privgrad - floor ms |")


def row(r: dict) -> str:
    if "error" in r:
        return f"| {r['model']} | {r['batch']} | fail: {r['error']} |" + " |" * 7
    ms, x = r["ms"], r["x"]
    opacus = (f"{_ms(ms['opacus'])} ({r['opacus_mode']})" if "opacus" in ms
              else "not installed" if "opacus" in r["probes"] else "none ran" if r["probes"]
              else "not asked (--variants)")
    x_opacus = f"{x['opacus']:.2f}" if "opacus" in x else "-"
    return (f"| {r['model']} | {r['batch']} | {_ms(ms['np'])} | {_ms(ms['floor'])} "
            f"| {_ms(ms['privgrad'])} | {opacus} | {x['np']:.2f} | {x['floor']:.2f} "
            f"| {x_opacus} | {r['overhead_ms']:+.1f} |")


def notes(r: dict) -> list[str]:
    where = f"- {r['model']} B={r['batch']}"
    out = []
    if "x_floor_quartiles" in r:
        lo, hi = r["x_floor_quartiles"]
        out.append(f"{where} x floor quartiles over rounds: {lo:.2f} - {hi:.2f}")
    probes = r.get("probes", {})
    if probes:
        out.append(f"{where} Opacus probe: " + "; ".join(
            f"{k.removeprefix('opacus-')} {_ms(v)} ms" if isinstance(v, float) else
            f"{k.removeprefix('opacus-')} {v}" for k, v in probes.items()))
    return out


def _ms(value: float) -> str:
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def run_table(models: list[str], batches: list[int], rounds: int, variants: list[str],
              max_gb: float) -> list[dict]:
    """Print the in-process table, row by row, then its notes; return the rows."""
    print(f"# mode: in-process, interleaved: one process, each round one step of every variant "
          f"in rotated order, {rounds} rounds after {WARMUP} warm-up steps each; ms are medians "
          f"over rounds, x = median of per-round ratios privgrad / column\n")
    print(HEAD)
    print("|" + "---|" * (HEAD.count("|") - 1))
    results = []
    for name in models:
        for batch in batches:
            r = measure(name, batch, rounds, variants, max_gb)
            results.append(r)
            print(row(r), flush=True)
            gc.collect()
    print("\nnotes:")
    for r in results:
        for line in notes(r):
            print(line)
    return results
