"""``opacus.accountants.utils.get_noise_multiplier`` on privgrad's calibration.

The search is privgrad's (``privgrad.accounting.get_noise_multiplier``): the noise found is
the smallest whose epsilon, *computed* by the accountant, is at or below the target, so it never
overshoots (Opacus's bisection stops within ``epsilon_tolerance`` below the target; that keyword
is accepted and unused). ``epochs`` become ``steps`` as privgrad counts them: ``round(1 / q)``
steps per epoch (Opacus: ``int(epochs / q)`` steps in all).
"""

from __future__ import annotations

from privgrad import _validate
from privgrad.accounting import get_noise_multiplier as _calibrate
from privgrad.opacus.accountants.accountant import privgrad_kind

__all__ = ["get_noise_multiplier"]


def get_noise_multiplier(*, target_epsilon: float, target_delta: float, sample_rate: float,
                         epochs: int | None = None, steps: int | None = None,
                         accountant: str = "rdp", epsilon_tolerance: float = 0.01,
                         **numerics) -> float:
    """The smallest noise multiplier meeting ``(target_epsilon, target_delta)`` after ``epochs``
    epochs or ``steps`` steps (exactly one) at ``sample_rate``.

    Args:
        target_epsilon, target_delta: the budget.
        sample_rate: q.
        epochs: epochs of ``round(1 / q)`` steps each; or
        steps: the number of steps.
        accountant: Opacus's name (default ``"rdp"``, as in Opacus); ``"prv"`` and ``"gdp"``
            are served by privgrad's PLD accountant.
        epsilon_tolerance: accepted for Opacus code, unused (privgrad's search never exceeds
            the target and stops within 0.1% of the noise).

    Privacy:
        The result is checked with the accountant to give epsilon <= ``target_epsilon``.
    """
    from privgrad.sampling import steps_per_epoch

    kind = privgrad_kind(accountant)
    if (epochs is None) == (steps is None):
        raise _validate.fail("exactly one of epochs and steps must be given", "(epochs, steps)",
                             (epochs, steps), "Pass epochs=<epochs> or steps=<optimizer steps>.")
    unknown = sorted(set(numerics) - {"eps_error", "delta_error", "alphas"})
    if unknown:
        raise _validate.fail("get_noise_multiplier takes Opacus's precision keywords only",
                             "keywords", unknown, "Drop them.")
    q = _validate.unit_interval_right_closed("sample_rate", sample_rate,
                                             "Pass the Poisson inclusion probability.")
    if steps is None:
        epochs = _validate.positive_int("epochs", epochs, "Pass the number of training epochs.")
        steps = epochs * steps_per_epoch(q)
    return _calibrate(target_epsilon=target_epsilon, target_delta=target_delta, sample_rate=q,
                      steps=steps, accountant=kind)
