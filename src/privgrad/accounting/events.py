"""Privacy events: frozen values that describe what a training run released.

An event says *what* happened (a Poisson-subsampled Gaussian step, repeated so many times, then
other steps with another noise level or sample rate); an accountant decides *how much privacy*
that costs. Keeping the two apart lets one history be measured by several accountants, and lets a
history be handed to Google's ``dp_accounting`` unchanged
([`to_dp_event()`][privgrad.accounting.events.to_dp_event]).

Privacy:
    An event is only a description; it guarantees nothing by itself. It assumes the mechanism
    really is what it says: every record is included in a step's batch independently with
    probability ``sample_rate`` (Poisson sampling), each record's contribution is clipped to L2
    norm ``max_grad_norm``, and Gaussian noise with standard deviation
    ``noise_multiplier * max_grad_norm`` is added to the *sum* of the clipped contributions.
    Neighbouring datasets differ by adding or removing one record.

This module imports no torch, and ``dp_accounting`` only inside
[`to_dp_event()`][privgrad.accounting.events.to_dp_event] (importing it pulls in SciPy's signal
processing, a second or more: ``import privgrad`` must not pay that).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Union

from privgrad import _validate
from privgrad.errors import ConfigTypeError

if TYPE_CHECKING:
    import dp_accounting

__all__ = [
    "PoissonGaussian",
    "TruncatedPoissonGaussian",
    "TruncatedEntry",
    "Repeated",
    "Composed",
    "Event",
    "HistoryEntry",
    "flatten",
    "to_dp_event",
]


def check_noise_multiplier(noise_multiplier: object) -> float:
    """``noise_multiplier`` as float; finite and >= 0 (0 means no noise: epsilon is inf)."""
    return _validate.finite_nonnegative(
        "noise_multiplier", noise_multiplier, "Pass the noise standard deviation over max_grad_norm, e.g. 1.0."
    )


def check_sample_rate(sample_rate: object) -> float:
    """``sample_rate`` as float in (0, 1]."""
    return _validate.unit_interval_right_closed(
        "sample_rate", sample_rate, "Pass the Poisson inclusion probability, e.g. batch_size / dataset_size."
    )


@dataclass(frozen=True)
class PoissonGaussian:
    """One step of DP-SGD: a Poisson-subsampled Gaussian mechanism.

    Args:
        noise_multiplier: noise standard deviation divided by ``max_grad_norm`` (sigma), >= 0.
        sample_rate: probability that a record is in the step's batch (q), in (0, 1].

    Privacy:
        Describes the add/remove-one neighbouring relation with Poisson sampling; see the module
        docstring. ``noise_multiplier == 0`` releases an unnoised sum (epsilon is infinite).
    """

    noise_multiplier: float
    sample_rate: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "noise_multiplier", check_noise_multiplier(self.noise_multiplier))
        object.__setattr__(self, "sample_rate", check_sample_rate(self.sample_rate))


@dataclass(frozen=True)
class TruncatedPoissonGaussian:
    """One DP-SGD step on a truncated Poisson sample: each of ``dataset_size`` records is
    sampled with probability ``sample_rate``, a sample larger than ``max_batch_size`` is cut to
    a uniformly random subset of that size, and the Gaussian mechanism runs on the rest
    (``dp_accounting``'s ``TruncatedSubsampledGaussianDpEvent``; arXiv 2508.15089).

    Privacy:
        Add/remove-one neighbours. Truncation can swap a record for another, so the event is
        accounted as a mixture of the untruncated step and a replace-one step of twice the
        sensitivity, weighted by the chance of truncation (``privgrad.accounting.truncated``).
    """

    noise_multiplier: float
    sample_rate: float
    dataset_size: int
    max_batch_size: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "noise_multiplier", check_noise_multiplier(self.noise_multiplier))
        object.__setattr__(self, "sample_rate", check_sample_rate(self.sample_rate))
        object.__setattr__(self, "dataset_size", _validate.positive_int(
            "dataset_size", self.dataset_size, "Pass the number of records sampled from."))
        object.__setattr__(self, "max_batch_size", _validate.positive_int(
            "max_batch_size", self.max_batch_size, "Pass the batch size samples are cut to."))


@dataclass(frozen=True)
class Repeated:
    """``event`` applied ``count`` times in a row (``count`` >= 0)."""

    event: "Event"
    count: int

    def __post_init__(self) -> None:
        _check_event("event", self.event)
        count = _validate.nonnegative_int("count", self.count, "Pass how many times the event repeats, e.g. 100.")
        object.__setattr__(self, "count", count)


@dataclass(frozen=True)
class Composed:
    """The events in ``events``, one after another (a noise schedule, a new batch size, ...)."""

    events: tuple

    def __post_init__(self) -> None:
        if isinstance(self.events, (str, bytes)) or not hasattr(self.events, "__iter__"):
            raise ConfigTypeError(
                f"events must be a sequence of events; got events={self.events!r}. "
                "Pass e.g. (Repeated(PoissonGaussian(1.0, 0.01), 100),)."
            )
        events = tuple(self.events)
        for i, event in enumerate(events):
            _check_event(f"events[{i}]", event)
        object.__setattr__(self, "events", events)


Event = Union[PoissonGaussian, TruncatedPoissonGaussian, Repeated, Composed]


def _check_event(name: str, event: object) -> None:
    if not isinstance(event, (PoissonGaussian, TruncatedPoissonGaussian, Repeated, Composed)):
        raise ConfigTypeError(
            f"{name} must be a PoissonGaussian, Repeated or Composed event; got {name}={event!r}. "
            "Build events from privgrad.accounting.events."
        )


class HistoryEntry(NamedTuple):
    """A run of ``num_steps`` identical steps, as an accountant records it."""

    noise_multiplier: float
    sample_rate: float
    num_steps: int


class TruncatedEntry(NamedTuple):
    """A run of ``num_steps`` identical truncated steps
    ([`TruncatedPoissonGaussian`][privgrad.accounting.events.TruncatedPoissonGaussian])."""

    noise_multiplier: float
    sample_rate: float
    num_steps: int
    dataset_size: int
    max_batch_size: int


def same_step(a, b) -> bool:
    """Whether two history entries describe the same step (they may then be merged)."""
    return type(a) is type(b) and a._replace(num_steps=0) == b._replace(num_steps=0)


def _entry(event, times: int):
    if isinstance(event, TruncatedPoissonGaussian):
        return TruncatedEntry(event.noise_multiplier, event.sample_rate, times,
                              event.dataset_size, event.max_batch_size)
    return HistoryEntry(event.noise_multiplier, event.sample_rate, times)


def _flatten_into(event: Event, times: int, out: list[HistoryEntry]) -> None:
    if isinstance(event, (PoissonGaussian, TruncatedPoissonGaussian)):
        if times == 0:
            return
        entry = _entry(event, times)
        if out and same_step(out[-1], entry):
            out[-1] = out[-1]._replace(num_steps=out[-1].num_steps + times)
        else:
            out.append(entry)
    elif isinstance(event, Repeated):
        _flatten_into(event.event, times * event.count, out)
    else:
        for _ in range(times):  # a repeated composition: usually times == 1
            for sub in event.events:
                _flatten_into(sub, 1, out)


def flatten(event: Event) -> tuple[HistoryEntry, ...]:
    """The steps of ``event`` in order, with consecutive equal steps merged into one entry."""
    _check_event("event", event)
    out: list[HistoryEntry] = []
    _flatten_into(event, 1, out)
    return tuple(out)


def _poisson_gaussian_to_dp(event: PoissonGaussian) -> dp_accounting.DpEvent:
    import dp_accounting

    gaussian = dp_accounting.GaussianDpEvent(event.noise_multiplier)
    if event.sample_rate == 1.0:
        return gaussian
    return dp_accounting.PoissonSampledDpEvent(event.sample_rate, gaussian)


def _truncated_to_dp(event: TruncatedPoissonGaussian) -> dp_accounting.DpEvent:
    import dp_accounting

    return dp_accounting.TruncatedSubsampledGaussianDpEvent(
        dataset_size=event.dataset_size, sampling_probability=event.sample_rate,
        truncated_batch_size=event.max_batch_size, noise_multiplier=event.noise_multiplier)


def _repeated_to_dp(event: Repeated) -> dp_accounting.DpEvent:
    import dp_accounting

    return dp_accounting.SelfComposedDpEvent(to_dp_event(event.event), event.count)


def _composed_to_dp(event: Composed) -> dp_accounting.DpEvent:
    import dp_accounting

    return dp_accounting.ComposedDpEvent([to_dp_event(e) for e in event.events])


# event type -> converter; the whole list of what dp_accounting receives from us.
_TO_DP_EVENT = {
    PoissonGaussian: _poisson_gaussian_to_dp,
    TruncatedPoissonGaussian: _truncated_to_dp,
    Repeated: _repeated_to_dp,
    Composed: _composed_to_dp,
}


def to_dp_event(event: Event) -> dp_accounting.DpEvent:
    """The equivalent ``dp_accounting`` event, for cross-checks or Google's own accountants."""
    _check_event("event", event)
    return _TO_DP_EVENT[type(event)](event)


def history_event(history: tuple[HistoryEntry, ...]) -> Composed:
    """A history (as recorded by an accountant) turned back into an event."""
    return Composed(tuple(Repeated(_event_of(e), e.num_steps) for e in history))


def _event_of(entry):
    if isinstance(entry, TruncatedEntry):
        return TruncatedPoissonGaussian(entry.noise_multiplier, entry.sample_rate,
                                        entry.dataset_size, entry.max_batch_size)
    return PoissonGaussian(entry.noise_multiplier, entry.sample_rate)


def is_nonprivate(noise_multiplier: float) -> bool:
    """Whether a step with this noise releases an unnoised sum (epsilon is infinite)."""
    return noise_multiplier == 0 or not math.isfinite(1.0 / noise_multiplier)
