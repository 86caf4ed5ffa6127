"""What every privgrad accountant shares: the step history, caching, checkpoints, input checks.

A concrete accountant only says how to turn a history into epsilon and delta
(``Accountant._compute_epsilon()``, ``Accountant._compute_delta()``). This module imports no
torch.
"""

from __future__ import annotations

import math
from typing import Any

from privgrad import _validate
from privgrad.accounting.events import (
    Composed,
    Event,
    HistoryEntry,
    TruncatedEntry,
    check_noise_multiplier,
    check_sample_rate,
    flatten,
    history_event,
    same_step,
)
from privgrad.errors import CheckpointError, ConfigError

__all__ = ["Accountant", "check_delta", "check_epsilon"]

STATE_FORMAT = 1


def check_delta(delta: object, name: str = "delta") -> float:
    """``delta`` as float in (0, 1)."""
    return _validate.open_unit(name, delta, "Pass a delta well below 1/dataset_size, e.g. 1e-5.")


def check_epsilon(epsilon: object, name: str = "epsilon") -> float:
    """``epsilon`` as float, finite and >= 0."""
    return _validate.finite_nonnegative(name, epsilon, "Pass a privacy budget such as 1.0 or 8.0.")


class Accountant:
    """Base class: records DP-SGD steps and answers epsilon and delta for them.

    Subclasses set ``name`` and implement ``_compute_epsilon(delta)`` and
    ``_compute_delta(epsilon)`` for a history with at least one step and no unnoised step.

    Privacy:
        The answer covers exactly the recorded steps, each a Poisson-subsampled Gaussian
        mechanism under add/remove-one neighbours (see ``privgrad.accounting.events``). A step
        with ``noise_multiplier == 0`` makes epsilon infinite and delta 1. Results are cached per
        history, so asking every step costs nothing until the next
        [`step()`][privgrad.accounting.accountant.Accountant.step].
    """

    name: str = ""

    def __init__(self) -> None:
        self._history: list[HistoryEntry] = []
        self._epsilon_cache: dict[float, float] = {}
        self._delta_cache: dict[float, float] = {}

    # ------------------------------------------------------------------ recording
    def step(self, *, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> None:
        """Record ``num_steps`` DP-SGD steps with this noise and sample rate.

        Args:
            noise_multiplier: noise standard deviation over ``max_grad_norm`` (sigma), >= 0.
            sample_rate: Poisson inclusion probability of each record (q), in (0, 1].
            num_steps: how many such steps ran, an integer >= 0 (0 records nothing).

        Raises:
            ConfigError: a value out of range. ConfigTypeError: a value of the wrong type.

        Privacy:
            Every step that touched private data must be recorded, including steps whose
            batch came out empty: they still release noise and are counted.
        """
        sigma = check_noise_multiplier(noise_multiplier)
        q = check_sample_rate(sample_rate)
        n = _validate.nonnegative_int(
            "num_steps", num_steps, "Pass how many steps ran with this noise and sample rate, e.g. 1."
        )
        self._append(HistoryEntry(sigma, q, n))

    def compose(self, event: Event) -> None:
        """Record every step that ``event`` describes (see ``privgrad.accounting.events``)."""
        for entry in flatten(event):
            self._append(entry)

    def _append(self, entry: HistoryEntry) -> None:
        if entry.num_steps == 0:
            return
        if self._history and same_step(self._history[-1], entry):
            last = self._history[-1]
            self._history[-1] = last._replace(num_steps=last.num_steps + entry.num_steps)
        else:
            self._history.append(entry)
        self._changed()

    def _changed(self) -> None:
        self._epsilon_cache.clear()
        self._delta_cache.clear()

    # ------------------------------------------------------------------ reading
    @property
    def steps(self) -> int:
        """Total number of steps recorded."""
        return sum(entry.num_steps for entry in self._history)

    @property
    def history(self) -> tuple[HistoryEntry, ...]:
        """``(noise_multiplier, sample_rate, num_steps)`` runs, consecutive equal steps merged."""
        return tuple(self._history)

    @property
    def event(self) -> Composed:
        """The recorded history as a privacy event (e.g. for
        [`to_dp_event()`][privgrad.accounting.events.to_dp_event])."""
        return history_event(self.history)

    def _nonprivate(self) -> bool:
        return any(entry.noise_multiplier == 0 for entry in self._history)

    def get_epsilon(self, delta: float) -> float:
        """Epsilon of everything recorded, at this ``delta``.

        Returns 0.0 before the first step and ``math.inf`` if some step had no noise.

        Raises:
            ConfigError: ``delta`` outside (0, 1).

        Privacy:
            An upper bound on the smallest epsilon for which the recorded steps are
            (epsilon, delta)-DP; see the subclass for how tight it is.
        """
        delta = check_delta(delta)
        cached = self._epsilon_cache.get(delta)
        if cached is None:
            if not self._history:
                cached = 0.0
            elif self._nonprivate():
                cached = math.inf
            else:
                cached = max(0.0, float(self._compute_epsilon(delta)))
            self._epsilon_cache[delta] = cached
        return cached

    def get_delta(self, epsilon: float) -> float:
        """Delta of everything recorded, at this ``epsilon``.

        Returns 0.0 before the first step and 1.0 if some step had no noise.

        Raises:
            ConfigError: ``epsilon`` negative or not finite.
        """
        epsilon = check_epsilon(epsilon)
        cached = self._delta_cache.get(epsilon)
        if cached is None:
            if not self._history:
                cached = 0.0
            elif self._nonprivate():
                cached = 1.0
            else:
                cached = min(1.0, max(0.0, float(self._compute_delta(epsilon))))
            self._delta_cache[epsilon] = cached
        return cached

    def _compute_epsilon(self, delta: float) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def _compute_delta(self, epsilon: float) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The accountant's state as plain data (round-trips through ``json``)."""
        return {
            "accountant": self.name,
            "format": STATE_FORMAT,
            "history": [list(e) for e in self._history],  # truncated steps: + [N, M]
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Replace the recorded history by the one in ``state_dict`` (from
        [`state_dict()`][privgrad.accounting.accountant.Accountant.state_dict]).

        Raises:
            CheckpointError: ``state_dict`` is malformed or was written by another kind of
                accountant. Nothing is changed in that case.
        """
        history = _parse_state(state_dict, self.name)
        self._history = []
        self._changed()
        for entry in history:
            self._append(entry)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(steps={self.steps}, history={self.history!r})"


def _parse_state(state: object, expected: str) -> list[HistoryEntry]:
    fix = "Pass the dict that state_dict() of the same kind of accountant returned."
    if not isinstance(state, dict):
        raise CheckpointError(f"an accountant state must be a dict; got state_dict={state!r}. {fix}")
    missing = {"accountant", "format", "history"} - set(state)
    if missing:
        raise CheckpointError(
            f"an accountant state needs the keys 'accountant', 'format', 'history'; "
            f"got keys={sorted(map(str, state))!r}. {fix}"
        )
    if state["accountant"] != expected:
        raise CheckpointError(
            f"the state must come from a {expected!r} accountant; got accountant={state['accountant']!r}. "
            f"Load it into make_accountant({state['accountant']!r}) instead, or start a new accountant."
        )
    if state["format"] != STATE_FORMAT:
        raise CheckpointError(f"the state format must be {STATE_FORMAT}; got format={state['format']!r}. {fix}")
    if not isinstance(state["history"], list):
        raise CheckpointError(f"history must be a list; got history={state['history']!r}. {fix}")
    entries = []
    for i, raw in enumerate(state["history"]):
        if not isinstance(raw, (list, tuple)) or len(raw) not in (3, 5):
            raise CheckpointError(
                f"history[{i}] must be [noise_multiplier, sample_rate, num_steps] (truncated steps: "
                f"+ [dataset_size, max_batch_size]); got history[{i}]={raw!r}. {fix}"
            )
        try:
            sigma = check_noise_multiplier(raw[0])
            q = check_sample_rate(raw[1])
            n = _validate.nonnegative_int("num_steps", raw[2], fix)
            if len(raw) == 5:
                truncation = tuple(_validate.positive_int(k, v, fix) for k, v in zip(
                    ("dataset_size", "max_batch_size"), raw[3:]))
        except (ConfigError, TypeError) as e:
            raise CheckpointError(f"history[{i}] is invalid: {e}") from e
        entries.append(HistoryEntry(sigma, q, n) if len(raw) == 3 else
                       TruncatedEntry(sigma, q, n, *truncation))
    return entries
