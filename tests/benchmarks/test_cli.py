"""The benchmark scripts' own settings and their refusal of bad arguments (the measurements
themselves are run by hand and committed to docs/performance.md, never asserted)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_step_time_gives_every_configuration_the_same_environment_settings():
    step_time = load("step_time")
    settings = argparse.Namespace
    assert step_time.run_env(settings(malloc_tuned=False, omp_spin=None)) == {}
    assert step_time.run_env(settings(malloc_tuned=False, omp_spin=0)) == {"GOMP_SPINCOUNT": "0"}
    both = step_time.run_env(settings(malloc_tuned=True, omp_spin=10000))
    assert both == {**step_time.TUNED_MALLOC, "GOMP_SPINCOUNT": "10000"}


@pytest.mark.parametrize("script,argv,message", [
    ("step_time", ["--omp-spin", "-1"], "--omp-spin must be a count of 0 or more; got -1"),
    ("step_time", ["--rounds", "0"], "--rounds must be 1 or more; got 0"),
    ("step_time", ["--models", "mlp,nope"], "--models must name models of step_time.py"),
    ("step_time", ["--in-process", "--malloc-tuned"],
     "--malloc-tuned and --omp-spin need a fresh process per configuration; got --in-process"),
    ("noise_spin", ["--sizes", "1000,x"], "--sizes must be comma-separated whole numbers"),
    ("noise_spin", ["--sizes", "0"], "--sizes must name at least one draw of 1 or more"),
    ("noise_spin", ["--spins", "fast"], "--spins takes 'default' or counts of 0 or more; got 'fast'"),
    ("noise_spin", ["--repeats", "0"], "--repeats must be 1 or more; got 0"),
    ("ghost_norms", ["--repeats", "0"], "--repeats must be 1 or more; got 0"),
    ("ghost_norms", ["--step", "1"], "--step must be a sequence length of 2 or more; got 1"),
    ("ghost_norms", ["--width", "6"], "--width must be a multiple of the 4 heads; got 6"),
    ("guards", ["--models", "mlp,nope"], "--models must name models of step_time.py"),
    ("guards", ["--rounds", "0"], "--rounds must be 1 or more; got 0"),
    ("fixed_cost", ["--steps", "0"], "--steps must be 1 or more; got 0"),
    ("fixed_cost", ["--models", "mlp,nope"], "--models must name models of step_time.py"),
    ("blocks", ["--models", "lstm,nope"], "--models must name models of step_time.py"),
    ("blocks", ["--block", "0"], "--block must be 1 or more; got 0"),
    ("blocks", ["--rounds", "0"], "--rounds must be 1 or more; got 0"),
])
def test_bad_arguments_are_refused_with_the_argument_and_value(script, argv, message, monkeypatch,
                                                               capsys):
    module = load(script)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *argv])
    with pytest.raises(SystemExit) as stop:
        module.main()
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def test_an_unknown_model_is_an_error_not_the_embedding_model():
    """It fell through to the embedding model before, and its row timed the wrong model."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2] / "benchmarks"))
    import reference_models

    with pytest.raises(ValueError, match=r"model must be one of mlp, .*; got model='nope'"):
        reference_models.build("nope", 4, "privgrad")
    assert type(reference_models.build("bag", 4, "privgrad")[0]).__name__ == "BagOfEmbeddings"


def test_every_stage_of_the_fixed_cost_budget_names_a_function_of_this_privgrad():
    """fixed_cost.py skips a stage it cannot find (to time older versions): a refactor that
    renames a timed function must update the table, not drop the stage from the budget."""
    fixed_cost = load("fixed_cost")
    missing = []
    for module_name, owner_name, attribute, stage in fixed_cost.STAGES:
        module = importlib.import_module(module_name)
        owner = module if owner_name is None else getattr(module, owner_name, None)
        if attribute not in getattr(owner, "__dict__", {}):
            missing.append(f"{module_name}.{owner_name or ''}.{attribute} ({stage})")
    assert not missing, f"stages that time nothing: {missing}"


def test_fixed_cost_of_the_toy_model_prints_its_budget(monkeypatch, capsys):
    fixed_cost = load("fixed_cost")
    monkeypatch.setattr(sys, "argv", ["fixed_cost.py", "--models", "toy", "--batches", "4",
                                      "--steps", "3"])
    fixed_cost.main()
    out = capsys.readouterr().out
    assert "toy B=4: non-private" in out and "privgrad - floor" in out
    for stage in ("clip factors", "hooks: forward", "norms: plan", "release: noise buffers"):
        assert f"| {stage} |" in out, stage
