"""What of a private training run must survive a restart, in one description.

[`state_dict()`][privgrad.run_state.state_dict] is the engine's side of every resume path
(privgrad's own checkpoints, the Lightning callback, the Hugging Face trainer): the privacy
settings, the accountant's history, the Poisson sampler's seed and position, the noise generators'
states, the step counters and the GradScaler's state. Plain data and tensors only, so it loads with
``torch.load(weights_only=True)``.

[`load_state_dict()`][privgrad.run_state.load_state_dict] checks everything before it changes
anything, and refuses an engine that has released steps already (they would vanish from the
accountant). A resumed run continues the sampler and the noise exactly where they stopped, whatever
PyTorch's own random state is: a run restarted from its seed would draw the first run's batches and
noise again, and subtracting two such releases cancels the noise.

Privacy:
    The state is as sensitive as the training data: the sampler's seed reveals every batch's
    membership and the generators' states the noise. Keep it where the data is kept. In secure
    mode neither exists (sampling and noise come from the operating system).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from privgrad.accounting import make_accountant
from privgrad.accounting.events import same_step
from privgrad.errors import CheckpointError, PrivacyStateError
from privgrad.sampling import numpy_bits, os_bits

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["FORMAT", "NOT_SAVED", "SAVED", "RunState", "load_state_dict", "state_dict"]

FORMAT = 1  #: version of the state's layout

#: Attributes of a PrivacyEngine that must survive a restart: each is in ``state_dict()``
#: (attribute -> key).
SAVED = {
    "accountant": "accountant", "secure_mode": "secure_mode", "noise": "noise",
    "settings": "settings", "steps": "steps", "dropped_examples": "dropped_examples",
    "_sampling": "dataset_size", "_sampler": "sampler", "_sampler_seed": "sampler",
    "_amp": "grad_scaler", "adaptive_clipping": "adaptive_clipping",
    "_mechanism_run": "mechanism",
}
#: Attributes of a PrivacyEngine that are not saved, and why (a test fails on an attribute in
#: neither table).
NOT_SAVED = {
    "performance": "performance settings may change on resume (they never change epsilon)",
    "check": "a resumed run checks its per-sample gradients again",
    "last_step_stats": "monitoring of the last step only",
    "layer_rules": "a report, made again by make_private",
    "_module": "structure: the objects passed to make_private",
    "_optimizer": "structure: the objects passed to make_private",
    "_recorder": "structure: hooks, made by make_private",
    "_guard": "structure: hooks, made by make_private",
    "_handles": "structure: hooks, made by make_private",
    "_distributed": "structure: the process group, joined by make_private",
    "_clipped": "per-step sums: state_dict refuses in the middle of a step",
    "_rows": "per-step rows: state_dict refuses in the middle of a step",
    "_release_now": "per-step: state_dict refuses inside a virtual batch",
    "_backward_since_step": "per-step: state_dict refuses in the middle of a step",
    "_undrawn": "per-step: rows set aside since the last step, never released",
    "_checking": "a resumed run checks its per-sample gradients again",
    "_checked": "a resumed run checks its per-sample gradients again",
    "_bounded": "derived from the settings by make_private",
    "_autocast": "per forward pass",
    "mechanism": "named in the settings (settings.mechanism); its noise state is saved",
}


def state_dict(engine) -> dict:
    """The engine's state (see the module docstring)."""
    _check_between_steps(engine, "state_dict")
    engine._guard.check_clean()
    sampler = engine._sampler
    return {
        "format": FORMAT,
        "settings": _settings(engine),
        "secure_mode": engine.secure_mode,
        "dataset_size": engine._sampling.dataset_size,
        "parameters": parameters(engine._module, engine._optimizer),
        "accountant": engine.accountant.state_dict(),
        "steps": engine.steps,
        "dropped_examples": engine.dropped_examples,
        "sampler": None if sampler is None else {
            "seed": engine._sampler_seed, "step": sampler.step,
            "num_records": sampler.num_records, "sample_rate": sampler.sample_rate,
            "steps": sampler.steps, "num_groups": getattr(sampler, "num_groups", 1),
            "group_key": getattr(sampler, "group_key", None)},
        "noise": engine.noise.state_dict(),
        "grad_scaler": engine._amp.scaler.state_dict() if engine._amp is not None else None,
        "adaptive_clipping": (None if engine.adaptive_clipping is None
                              else engine.adaptive_clipping.state_dict()),
        "mechanism": (None if engine._mechanism_run is None
                      else engine._mechanism_run.state_dict()),
        # FSDP2: this rank's noise source draws this rank's shard (privgrad.distributed.fsdp)
        "sharding": engine._distributed.layout() if getattr(
            engine._distributed, "sharded", False) else None,
    }


def load_state_dict(engine, state: dict) -> None:
    """Check ``state`` against this engine, then continue from it (see the module docstring)."""
    check(engine, state)
    apply(engine, state)


def check(engine, state: dict) -> None:
    """Raise if ``state`` cannot continue in this engine; change nothing."""
    _check_between_steps(engine, "load_state_dict")
    if engine.steps:
        raise PrivacyStateError(
            f"a saved run must be loaded before the first step; got an engine that has released "
            f"{engine.steps} step(s) already, which the loaded accountant would drop. Load the "
            f"state right after make_private, in a fresh PrivacyEngine.")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"the engine state must be a dict of format {FORMAT} (from engine.state_dict()); got "
            f"format={got!r}. Pass what state_dict() returned, unchanged.")
    here = state_dict(engine)
    saved_settings = state.get("settings")
    if isinstance(saved_settings, dict):  # a setting added since the state was saved: its default
        defaults = {f.name: f.default for f in dataclasses.fields(engine.settings)}
        state = {**state, "settings": {**{k: defaults.get(k) for k in here["settings"]},
                                       **saved_settings}}
    if state.get("sharding") != here["sharding"]:
        raise CheckpointError(
            f"a sharded (FSDP2) run's engine state belongs to one rank of one world size (its "
            f"noise source draws that rank's shard); got {state.get('sharding')!r} saved and "
            f"{here['sharding']!r} here. Load each rank's own engine state in a job of the saved "
            f"world size (the model and optimizer reshard through torch.distributed.checkpoint; "
            f"the noise streams do not). Nothing was loaded.")
    for key in ("settings", "secure_mode", "dataset_size", "parameters"):
        if state.get(key) != here[key]:
            if key == "settings" and isinstance(state.get(key), dict):
                for name, value in here[key].items():
                    if state[key].get(name) != value:
                        raise CheckpointError(mismatch(f"privacy setting {name}",
                                                       state[key].get(name), value))
            what = "model parameters (name, shape, dtype)" if key == "parameters" else \
                key.replace("_", " ")
            raise CheckpointError(mismatch(what, state.get(key), here[key]))
    name = (state.get("accountant") or {}).get("accountant")
    if name != engine.accountant.name:
        raise CheckpointError(mismatch("accountant", name, engine.accountant.name))
    loaded = make_accountant(engine.accountant.name)
    try:
        loaded.load_state_dict(state["accountant"])
    except CheckpointError as e:
        raise CheckpointError(f"the saved accountant state is invalid: {e}") from e
    held = engine.accountant.history  # releases before training (release_sum), replaced below
    if held and not _begins_with(loaded.history, held):
        raise CheckpointError(mismatch("accountant history before training (release_sum)",
                                       loaded.history[:len(held)], held))
    saved, live = state.get("sampler"), here["sampler"]
    if (saved is None) != (live is None) or (saved is not None and any(
            saved.get(k, 1 if k == "num_groups" else None) != live[k]
            for k in ("num_records", "sample_rate", "steps", "num_groups"))):
        raise CheckpointError(mismatch("Poisson sampler", saved, live))
    if (state.get("grad_scaler") is None) != (engine._amp is None):
        raise CheckpointError(mismatch("use of a grad_scaler", state.get("grad_scaler") is not None,
                                       engine._amp is not None))
    adaptive = state.get("adaptive_clipping")
    if (adaptive is None) != (engine.adaptive_clipping is None) or (
            adaptive is not None and len(adaptive.get("bounds", ())) != state.get("steps")):
        raise CheckpointError(mismatch("adaptive clipping state", adaptive, here["adaptive_clipping"]))
    noise = state.get("noise")
    if not isinstance(noise, dict) or (not engine.secure_mode and "generators" not in noise):
        raise CheckpointError(mismatch("noise source state", noise, here["noise"]))
    run, saved_run = engine._mechanism_run, state.get("mechanism")
    why = (None if run is None and saved_run is None else "a correlated-noise state where the "
           "run has none" if run is None else run.check_state(saved_run))
    if why is not None:
        raise CheckpointError(
            f"the saved state must come from a run with the same noise mechanism; got {why}. "
            f"Call make_private with the mechanism and steps (or epochs) of the run that saved "
            f"it, or start a new run.")


def _begins_with(history: tuple, prefix: tuple) -> bool:
    """Whether ``history`` starts with the steps of ``prefix`` (its last run may have merged
    with more steps of the same kind)."""
    k = len(prefix) - 1
    return (len(history) > k and history[:k] == prefix[:k] and same_step(history[k], prefix[k])
            and history[k].num_steps >= prefix[k].num_steps)


def apply(engine, state: dict) -> None:
    """Continue from ``state`` (already [`check()`][privgrad.run_state.check]-ed)."""
    engine.accountant.load_state_dict(state["accountant"])
    engine.steps = int(state["steps"])
    engine.dropped_examples = int(state["dropped_examples"])
    sampler = state["sampler"]
    if sampler is not None:
        seed = sampler["seed"]
        engine._sampler.bits = os_bits if seed is None else numpy_bits(int(seed))
        engine._sampler_seed = seed
        engine._sampler.step = int(sampler["step"])
        if sampler.get("group_key") is not None:  # cyclic sampling: the saved run's groups
            engine._sampler.rekey(int(sampler["group_key"]))
            if hasattr(engine._sampling, "rekeyed"):  # truncated: its event follows them
                engine._sampling = engine._sampling.rekeyed(int(sampler["group_key"]))
    engine.noise.load_state_dict(state["noise"])
    if engine._mechanism_run is not None:
        engine._mechanism_run.load_state_dict(state["mechanism"])
    if engine._amp is not None:
        engine._amp.scaler.load_state_dict(state["grad_scaler"])
    if engine.adaptive_clipping is not None:
        engine.adaptive_clipping.load_state_dict(state["adaptive_clipping"])


def parameters(module, optimizer) -> list:
    """``[name, shape, dtype]`` of every optimizer parameter, in optimizer order."""
    names = {p: n for n, p in module.named_parameters()}
    return [[names.get(p, "?"), list(p.shape), str(p.dtype)]
            for group in optimizer.param_groups for p in group["params"]]


def mismatch(what: str, saved, here) -> str:
    return (f"the saved state must come from a run with the same {what}; got {saved!r} saved and "
            f"{here!r} here. Call make_private with the settings of the run that saved it (or "
            f"pass the same objects), or start a new run.")


def _settings(engine) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v)
            for k, v in dataclasses.asdict(engine.settings).items()}


def _check_between_steps(engine, what: str) -> None:
    if engine._module is None or engine.settings is None:
        raise PrivacyStateError(
            f"{what} needs an engine with a model attached; got an engine before make_private "
            f"(or after detach). Call engine.make_private(...) first, with the run's settings.")
    if engine._clipped.stats.backward_passes or not engine._release_now:
        raise PrivacyStateError(
            f"{what} must run between steps; got clipped gradients waiting for optimizer.step() "
            f"(a backward pass without its step, or inside a virtual batch). Call it after "
            f"optimizer.step().")


class RunState:
    """The engine's methods for the state of a run (a base of
    [`PrivacyEngine`][privgrad.PrivacyEngine]; the functions above do the work)."""

    def state_dict(self) -> dict:
        """Everything of the privacy run that must survive a restart (see
        [`privgrad.run_state`][privgrad.run_state]): settings, accountant, sampler seed and
        position, the noise generators, counters and the GradScaler link. Plain data and tensors
        only.

        Raises:
            PrivacyStateError: before ``make_private``, in the middle of a step, or after the
                state guard caught a write.
        """
        return state_dict(self)

    def load_state_dict(self, state: dict) -> None:
        """Continue the run [`state_dict()`][privgrad.PrivacyEngine.state_dict] described, after
        ``make_private`` with the same settings and before the first step. Checks everything before
        changing anything.

        Raises:
            CheckpointError: another configuration, model or accountant.
            PrivacyStateError: this engine has released steps already (they would go
                unaccounted), or is in the middle of a step.
        """
        load_state_dict(self, state)

    def privacy_report(self, delta: float, *, deltas=None):
        """What the steps so far allow the best membership attack to do: epsilon at several
        deltas, the attack's trade-off curve, its TPR at FPR 0.1%, 1% and 10%, its advantage and
        the Gaussian-DP ``mu`` (see
        [`privacy_report()`][privgrad.accounting.report.privacy_report]); ``print(report.text())``.

        Raises:
            ConfigError: a delta outside (0, 1).

        Privacy:
            Reads the accountant only; pessimistic like the accountant's epsilon.
        """
        from privgrad.accounting.report import privacy_report

        return privacy_report(self.accountant, delta=delta, deltas=deltas)

    def save_checkpoint(self, path, *, module: nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler=None, extra=None) -> None:
        """Write model, optimizer, scheduler and [`state_dict()`][privgrad.PrivacyEngine.state_dict]
        to ``path``, atomically (see
        [`privgrad.checkpoint.save_checkpoint()`][privgrad.checkpoint.save_checkpoint])."""
        from privgrad import checkpoint

        checkpoint.save_checkpoint(self, path, module=module, optimizer=optimizer,
                                   scheduler=scheduler, extra=extra)

    def load_checkpoint(self, path, *, module: nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler=None, restore_rng: bool = True):
        """Resume from ``path`` after ``make_private`` with the same settings; return the saved
        ``extra`` (see
        [`privgrad.checkpoint.load_checkpoint()`][privgrad.checkpoint.load_checkpoint]). The sampler
        and the noise always continue where the saved run stopped; ``restore_rng`` restores
        PyTorch's own random states too (dropout, augmentation)."""
        from privgrad import checkpoint

        return checkpoint.load_checkpoint(self, path, module=module, optimizer=optimizer,
                                          scheduler=scheduler, restore_rng=restore_rng)

