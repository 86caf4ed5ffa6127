"""What the accountant records for a correlated-noise mechanism: the amplification reduction.

Amplified BandMF (Choquette-Choo et al. 2023, "Amplified banded matrix factorization: a unified
approach to private training", Theorem 4 and Algorithm 2) samples cyclically: the data set is
split into ``b`` fixed groups of (about) ``N / b`` records, and step ``t`` draws each record of
group ``t mod b`` independently with probability ``p``. A record of group ``g`` can only take part
in steps ``g, g + b, g + 2b, ...``: at most ``ceil(n / b)`` of the ``n`` steps. With a ``b``-banded
strategy ``C`` whose columns have norm at most 1, the rows that one participation touches
(``t .. t + b - 1``) are disjoint from those of the next one, so the release ``C x + sigma z``
splits into independent pieces, one per possible participation, each a Poisson-subsampled
Gaussian mechanism with sensitivity 1. The whole run is therefore accounted as DP-SGD with
``ceil(n / b)`` rounds at sample rate ``p`` and noise multiplier ``sigma``, with any accountant
(PLD or RDP).

This module imports no torch.
"""

from __future__ import annotations

from privgrad import _validate
from privgrad.accounting.events import PoissonGaussian, Repeated

__all__ = ["amplified_event", "check_num_bands", "check_steps", "positive_int", "rounds",
           "starts_round"]


positive_int = _validate.positive_int  # for strategies.py and streaming.py


def check_steps(steps: object) -> int:
    """``steps`` (the run's number of noisy steps ``n``) as int >= 1."""
    return positive_int("steps", steps, "Pass the total number of training steps, e.g. 1000.")


def check_num_bands(num_bands: object, steps: int | None = None) -> int:
    """``num_bands`` as int in ``[1, steps]`` (``steps`` unchecked when ``None``)."""
    b = positive_int(
        "num_bands", num_bands,
        "Pass the number of bands b >= 1 (b = 1 is DP-SGD), e.g. BandMF(num_bands=16).")
    if steps is not None and b > steps:
        raise _validate.fail(
            f"num_bands must be <= the number of steps ({steps})", "num_bands", num_bands,
            f"Pass num_bands <= {steps}, or plan more steps: a band longer than the run is "
            "never used.")
    return b


def rounds(steps: int, num_bands: int) -> int:
    """``ceil(steps / num_bands)``: the most steps one record can take part in."""
    return -(-steps // num_bands)


def starts_round(step: int, num_bands: int) -> bool:
    """Whether step ``step`` (counted from 0) opens a new round of the reduction
    (``step % num_bands == 0``): an engine that records one event per round records it then,
    so that after ``n`` steps it has recorded ``rounds(n, num_bands)`` events."""
    return step % num_bands == 0


def amplified_event(noise_multiplier: float, sample_rate: float, steps: int,
                    num_bands: int) -> Repeated:
    """The privacy event of ``steps`` steps of amplified BandMF with ``num_bands`` bands.

    Args:
        noise_multiplier: ``sigma``: the standard deviation of the uncorrelated draws ``z``
            divided by ``max_grad_norm`` (the released noise is ``sigma * max_grad_norm * B z``).
        sample_rate: ``p``: the probability that a record of the step's group is drawn (with
            ``N`` records, ``b`` groups and expected batch size ``B``: ``p = B b / N``).
        steps: ``n``, the number of noisy steps, >= 1.
        num_bands: ``b``, the number of bands (and of groups), in ``[1, steps]``.

    Returns:
        ``Repeated(PoissonGaussian(noise_multiplier, sample_rate), ceil(steps / num_bands))``.
        With ``num_bands == 1`` this is DP-SGD's event for ``steps`` steps.

    Privacy:
        Guarantees nothing by itself; it assumes (1) cyclic Poisson sampling with ``num_bands``
        fixed groups formed independently of the data, (2) a strategy with ``num_bands`` bands
        (or fewer) whose columns have L2 norm at most 1, as ``BandMF.coefficients`` builds, and
        (3) each record's contribution clipped to ``max_grad_norm``. Add/remove-one neighbours
        (the record's group is fixed by its position, not by the data).
    """
    n = check_steps(steps)
    b = check_num_bands(num_bands, n)
    return Repeated(PoissonGaussian(noise_multiplier, sample_rate), rounds(n, b))
