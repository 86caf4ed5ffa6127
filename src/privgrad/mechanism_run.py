"""A correlated-noise mechanism attached to a private run: the wiring between
``privgrad.mechanisms`` (strategies, streaming noise, events), the cyclic sampler and the
release.

``make_private(..., mechanism=BandMF(num_bands=b), epochs=...)`` (or ``BLT(...)``) resolves here
how the run samples (cyclic Poisson sampling with the mechanism's groups, at ``p = q b`` within
a group), how many steps the noise is planned for, and, for ``make_private_with_epsilon``, the
noise multiplier. During training [`MechanismRun`][privgrad.mechanism_run.MechanismRun] gives
each release its noise row (the sampler step that drew the batch), forms the release, and
records the accountant's event once per round of the reduction.

Plain DP-SGD (``DPSGD()``, the default, and ``BandMF(num_bands=1)``, which *is* DP-SGD) takes
none of this: the engine's ordinary path, bit for bit.

Privacy:
    The guarantee of a correlated mechanism (``privgrad.mechanisms``) holds when (1) each
    record takes part only in the steps of its group, ``b`` apart: the cyclic sampler draws
    step ``t`` from group ``t mod b``, and each release uses the noise row of the sampler step
    that drew its batch, so skipped batches (their rows drawn and thrown away) cannot bring two
    participations closer; (2) the run stays within the steps the strategy was built for: a
    step beyond them is refused; (3) every round that a released step belongs to is recorded:
    at most ``ceil(n / b)`` rounds for BandMF, the whole run's Gaussian mechanism at the first
    step for BLT. Loops that skip drawn batches are refused (``privgrad.engine.rows``): a
    skipped batch followed by one of exactly the same size could not be told apart from a loop
    that reads ahead.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from privgrad import _validate
from privgrad.errors import ConfigError, ConfigTypeError, PrivacyStateError
from privgrad.mechanisms import BLT, DPSGD, BandMF, MechanismWarning
from privgrad.privatize.correlated import CorrelatedRelease, layout
from privgrad.sampling.plan import plan as sampling_plan
from privgrad.sampling.poisson import os_bits

__all__ = ["MechanismRun", "calibrate", "check_mechanism", "compare_with_dpsgd",
           "correlated", "group_key", "plan", "planned_steps"]


_TYPES = (DPSGD, BandMF, BLT)


def check_mechanism(mechanism: object):
    """``mechanism`` (``None``: ``DPSGD()``) if it is one of privgrad's mechanisms."""
    if mechanism is None:
        return DPSGD()
    if not isinstance(mechanism, _TYPES):
        raise ConfigTypeError(
            f"mechanism must be privgrad.mechanisms.DPSGD(), BandMF(num_bands=b) or "
            f"BLT(num_buffers=k); got mechanism={mechanism!r}. Pass one of them (or leave it "
            f"out for DP-SGD).")
    return mechanism


def correlated(mechanism) -> bool:
    """Whether ``mechanism`` correlates its noise (BandMF with ``b > 1``, any BLT)."""
    return isinstance(mechanism, BLT) or (isinstance(mechanism, BandMF)
                                          and mechanism.num_bands > 1)


def group_key(secure: bool, seed: int | None = None, sampling=None) -> int:
    """The key of cyclic sampling's groups: the plan's own (``sampling.group_key``: a truncated
    plan draws it early, its accounting needs the group sizes), else in secure mode the
    operating system's, else ``seed`` or a fresh draw from torch's generator."""
    if getattr(sampling, "group_key", None) is not None:
        return sampling.group_key
    if secure:
        return int(os_bits(1)[0])
    return seed if seed is not None else int(torch.randint(0, 2**62, (1,)))


def describe(mechanism) -> str | None:
    """How settings and checkpoints name a correlated mechanism (``None`` for DP-SGD)."""
    return repr(mechanism) if correlated(mechanism) else None


def plan(data_loader, mechanism, steps, epochs, *, poisson_sampling=True, sample_rate=None,
         expected_batch_size=None, loss_reduction="mean", required=False, **_):
    """``(mechanism, sampling plan, planned steps)`` for ``make_private``'s arguments
    (``required``: exactly one of ``steps`` and ``epochs``, as calibration needs)."""
    mechanism = check_mechanism(mechanism)
    if correlated(mechanism) and not poisson_sampling:
        raise _validate.fail(
            f"mechanism={mechanism!r} needs privgrad's cyclic Poisson sampling",
            "poisson_sampling", poisson_sampling, "Pass poisson_sampling=True (the default).")

    def make_plan(groups):
        return sampling_plan(data_loader, poisson_sampling=poisson_sampling,
                             sample_rate=sample_rate, expected_batch_size=expected_batch_size,
                             loss_reduction=loss_reduction, num_groups=groups)

    if required and (steps is None) == (epochs is None):
        raise _validate.fail(
            "exactly one of epochs and steps must be given", "(epochs, steps)",
            (epochs, steps), "Pass epochs=<training epochs> or steps=<optimizer steps>.")
    return (mechanism, *planned_steps(mechanism, steps=steps, epochs=epochs, make_plan=make_plan))


def planned_steps(mechanism, *, steps, epochs, make_plan):
    """``(sampling, n)``: the sampling plan (``make_plan(num_groups)``) and the number of steps
    the noise is planned for (``None`` for DP-SGD without ``steps``/``epochs``)."""
    if steps is not None and epochs is not None:
        raise _validate.fail("at most one of steps and epochs may be given", "(steps, epochs)",
                             (steps, epochs), "Pass steps=<optimizer steps> or epochs=<epochs>.")
    if steps is not None:
        steps = _validate.positive_int("steps", steps, "Pass the run's number of optimizer steps.")
    if epochs is not None:
        epochs = _validate.positive_int("epochs", epochs, "Pass the run's number of epochs.")
    if not correlated(mechanism):
        sampling = make_plan(1)
        return sampling, steps if epochs is None else epochs * sampling.steps_per_epoch
    if steps is None and epochs is None:
        raise _validate.fail(
            f"mechanism={mechanism!r} plans its noise for the run's length, so steps or epochs "
            f"must be given", "(steps, epochs)", (None, None),
            "Pass epochs=<training epochs> or steps=<optimizer steps> to make_private.")
    if isinstance(mechanism, BLT) and mechanism.min_sep is None:
        if steps is None:
            raise _validate.fail(
                "BLT(min_sep=None) lets each record take part once in the whole run, which "
                "needs the number of steps itself", "epochs", epochs,
                "Pass steps=<optimizer steps> (one group per step), or BLT(min_sep=<steps "
                "between a record's participations>) with epochs.")
        groups = steps
    else:
        groups = mechanism.min_sep if isinstance(mechanism, BLT) else mechanism.num_bands
    sampling = make_plan(groups)
    n = steps if steps is not None else epochs * sampling.steps_per_epoch
    if sampling.dataset_size is not None and groups > sampling.dataset_size:
        raise _validate.fail(f"the groups must not outnumber the records ({sampling.dataset_size})",
                             "num_groups", groups, "Pass fewer bands, a smaller min_sep, or "
                             "fewer steps.")
    mechanism.num_groups(n)  # num_bands <= n, min_sep <= n
    return sampling, n


def calibrate(mechanism, sampling, n: int, *, target_epsilon, target_delta,
              accountant: str, prior=None) -> float:
    """The smallest noise multiplier whose event (``mechanism.event``; each round a step of
    ``sampling`` when the mechanism is amplified, e.g. a truncated one), after ``prior`` (what
    was spent already, an event or ``None``), meets the target."""
    from privgrad.accounting import get_noise_multiplier
    from privgrad.accounting.events import flatten

    (entry,) = flatten(mechanism.event(1.0, sampling.sample_rate, n))  # one kind of step
    truncated = getattr(sampling, "max_batch_size", None) is not None  # (BLT: refused)
    sigma = get_noise_multiplier(target_epsilon=target_epsilon, target_delta=target_delta,
                                 sample_rate=entry.sample_rate, steps=entry.num_steps,
                                 accountant=accountant, prior=prior,
                                 event=sampling.event if truncated else None)
    if not truncated:
        compare_with_dpsgd(mechanism, sampling.base_rate, n, sigma, target_epsilon=target_epsilon,
                           target_delta=target_delta, accountant=accountant, prior=prior)
    return sigma


def compare_with_dpsgd(mechanism, base_rate: float, n: int, sigma: float, *, target_epsilon,
                       target_delta, accountant: str, prior=None) -> float:
    """Warn (``MechanismWarning``) where ``mechanism`` with noise multiplier ``sigma`` is
    expected to leave more noise in the iterates than DP-SGD calibrated to the same target on
    Poisson sampling at ``base_rate`` (the user's expected batch over the data set) for the same
    ``n`` steps; returns the ratio of the two.

    The measure is each mechanism's ``sigma^2 * expected_error(n)`` on the mechanism's own
    workload (``privgrad.mechanisms``): the mean squared noise of the iterates per coordinate.
    It ranks mechanisms well where they differ a lot, not where they are within a few tens of
    percent (docs/correlated_noise.md, measured against training runs); the warning fires only
    where the correlated mechanism is expected to be the noisier one, e.g. BLT (accounted
    without amplification) at small epsilon.
    """
    from privgrad.accounting import get_noise_multiplier

    baseline = DPSGD(workload=mechanism.workload, momentum=mechanism.momentum)
    sigma_sgd = get_noise_multiplier(target_epsilon=target_epsilon, target_delta=target_delta,
                                     sample_rate=base_rate, steps=n, accountant=accountant,
                                     prior=prior)
    mine = sigma ** 2 * mechanism.expected_error(n)
    theirs = sigma_sgd ** 2 * baseline.expected_error(n)
    ratio = mine / theirs
    if ratio > 1:
        why = ("; BLT is accounted as one Gaussian mechanism, without amplification by "
               "sampling" if not mechanism.amplified else "")
        warnings.warn(
            f"mechanism={mechanism!r} at epsilon {target_epsilon:g} over {n} steps is expected "
            f"to train with more noise than DP-SGD at the same epsilon: sigma^2 * "
            f"expected_error = {mine:.4g} against DP-SGD's {theirs:.4g} ({ratio:.2f}x; noise "
            f"multiplier {sigma:.4g} against {sigma_sgd:.4g}{why}). Use the default DP-SGD, "
            f"or BandMF with fewer bands; compare mechanisms before training with `privgrad "
            f"noise --mechanism ...`.", MechanismWarning, stacklevel=4)
    return ratio


class MechanismRun:
    """A correlated mechanism during training (see the module docstring).

    Args:
        mechanism: a correlated mechanism (``correlated(mechanism)``).
        steps: ``n``, the steps its noise is planned for.
        params: the privatised parameters, in optimizer order.
        source: the run's noise source (seeded), for the independent draws.
    """

    def __init__(self, mechanism, steps: int, params: list[nn.Parameter], source):
        if source.secure and not hasattr(source, "standard_normal"):
            raise ConfigError(
                f"correlated noise in secure mode draws standard normal values from the noise "
                f"source; got noise={type(source).__name__} without standard_normal(). Use "
                f"secure_mode=True with privgrad's SecureGaussian.")
        if not source.secure and not source.fuses_sums:
            raise ConfigError(
                f"correlated noise draws its independent values with sample_many(); got "
                f"noise={type(source).__name__} with fuses_sums=False. Use TorchGaussian or "
                f"secure_mode=True.")
        self.mechanism, self.steps = mechanism, steps
        groups = layout(params, source.secure)
        streams = {}
        for (dtype, device), members in groups.items():
            like = torch.empty(sum(p.numel() for p in members), dtype=dtype, device=device)
            streams[(dtype, device)] = mechanism.noise(steps, like)
        self.noise = CorrelatedRelease(streams, groups, source)
        self.last_round: int | None = None  # the last round recorded in the accountant

    def check_parameters(self, params: list[nn.Parameter], names: dict) -> None:
        """Refuse a parameter trainable now that had no noise generator at ``make_private``
        (before anything is released): its clipped sum would have no correlated noise."""
        known = {id(p) for members in self.noise.groups.values() for p in members}
        late = [p for p in params if id(p) not in known]
        if late:
            listed = ", ".join(names.get(p, str(tuple(p.shape))) for p in late[:5])
            raise PrivacyStateError(
                f"correlated noise builds its generators for the parameters trainable at "
                f"make_private; got {listed} trainable after it (requires_grad_(True) or "
                f"optimizer.add_param_group). Make them trainable before make_private, or start "
                f"a new phase (engine.detach(), then make_private again). Nothing was released.")

    def row(self, sampler_step: int | None) -> int:
        """The noise row of a release whose batch sampler step ``sampler_step`` drew; refused
        beyond the planned steps (before anything is released)."""
        if sampler_step is None:
            raise PrivacyStateError(
                "correlated noise needs the sampler step of each released batch; got a batch "
                "the private loader does not know. Iterate the loader make_private returned. "
                "Nothing was released.")
        if sampler_step >= self.steps:
            raise PrivacyStateError(
                f"the noise of mechanism={self.mechanism!r} was planned for {self.steps} steps; "
                f"got a step on the batch of sampler step {sampler_step + 1}. Its sensitivity "
                f"was analysed for those steps only. Plan the run's full length (steps= or "
                f"epochs= to make_private), or start a new phase (engine.detach(), then "
                f"make_private again: the accountant composes both). Nothing was released.")
        return sampler_step

    def release(self, sums: dict, *, row: int, noise_std: float, normaliser: float) -> dict:
        return self.noise.release(sums, row=row, noise_std=noise_std, normaliser=normaliser)

    def account(self, accountant, row: int, noise_multiplier: float, sampling) -> None:
        """Record the round ``row`` belongs to, once: an amplified mechanism's round is one
        step of ``sampling`` (its plan's event: Poisson or truncated), BLT's the whole run."""
        r = self.mechanism.round_of(row)
        if r != self.last_round:
            accountant.compose(sampling.event(noise_multiplier) if self.mechanism.amplified
                               else self.mechanism.round_event(noise_multiplier,
                                                               sampling.sample_rate))
            self.last_round = r

    def state_dict(self) -> dict:
        return {"mechanism": describe(self.mechanism), "steps": self.steps,
                "last_round": self.last_round, "noise": self.noise.state_dict()}

    def check_state(self, state: object) -> str | None:
        """Why ``state`` cannot continue this run (``None`` if it can)."""
        if not isinstance(state, dict):
            return f"mechanism state {state!r} saved, {describe(self.mechanism)!r} here"
        if state.get("mechanism") != describe(self.mechanism) or state.get("steps") != self.steps:
            return (f"mechanism {state.get('mechanism')!r} for {state.get('steps')!r} steps saved, "
                    f"{describe(self.mechanism)!r} for {self.steps} here")
        return self.noise.check_state(state.get("noise"))

    def load_state_dict(self, state: dict) -> None:
        self.noise.load_state_dict(state["noise"])
        self.last_round = state["last_round"]
