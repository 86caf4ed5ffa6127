"""User-level sampling: Poisson over users, at most ``k`` examples of each sampled user.

With ``privacy_unit="user"`` the unit of privacy is a person, not a row: neighbouring data sets
differ by all the rows of one user. Each step includes each of the ``U`` users independently with
probability ``q`` (the [`PoissonSampler`][privgrad.sampling.poisson.PoissonSampler] over
users, so its guarantees carry over), and a sampled user with more than ``k`` rows contributes
``k`` of them,
chosen uniformly at random without replacement, afresh at every step. The choice reads only how
many rows the user has and random bits, never the data or a gradient. A batch lists each sampled
user's rows together, users in index order.

The bits of the row choice come from the sampler's own source (``bits``), keyed by ``(step,
user)``: with the seed and the step counter (which the engine's ``state_dict`` saves) a resumed
run draws exactly the rows an uninterrupted one would, and one user's choice does not depend on
the number of users. In secure mode they come from the operating system.

With a correlated-noise mechanism (``mechanism=BandMF(...)`` or ``BLT(...)``) the users are
sampled cyclically instead ([`CyclicUserSampler`][privgrad.sampling.users.CyclicUserSampler]):
each user belongs to one of ``b`` groups drawn from the secret key, as a record does under
example-level cyclic sampling
([`CyclicPoissonSampler`][privgrad.sampling.cyclic.CyclicPoissonSampler], whose guarantees
carry over with users as its records), and step ``t`` draws each user of group ``t mod b`` with
probability ``p = q b``; the rows of a drawn user are chosen as above.

This module imports no torch.

Privacy:
    The accountant records the Poisson-subsampled Gaussian mechanism with ``q`` over users (under
    cyclic sampling: the mechanism's event over users, each round at ``p``): that is user-level
    DP provided each sampled user's examples enter one backward pass together and their summed
    gradient is clipped to ``C`` as one vector (``privgrad.engine.groups``; the engine refuses a
    pass that splits a user). The number of users and of each user's rows are treated as public
    unless ``sample_rate`` and ``expected_batch_size`` are given.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np

from privgrad import _validate
from privgrad.errors import ConfigError, ConfigTypeError
from privgrad.sampling.cyclic import CyclicPoissonSampler
from privgrad.sampling.loader import DrawnBatches, poisson_loader
from privgrad.sampling.plan import SamplingPlan
from privgrad.sampling.poisson import Bits, PoissonSampler, numpy_bits, os_bits

__all__ = ["UNITS", "CyclicUserSampler", "UserPlan", "UserSampler", "user_index", "user_plan"]

#: The privacy units ``make_private`` takes.
UNITS = ("example", "user")

#: Keys of the row choice's bits start here: above every step number the Poisson draw uses.
_CHOICE_KEY = 2**62


def user_index(user_ids: object, num_records: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """``(user of each record, rows of each user)`` from one id per record.

    Users are numbered in order of first appearance; each user's rows are sorted."""
    if user_ids is None:
        raise _validate.fail(
            "privacy_unit='user' needs one user id per example of the data set", "user_ids",
            None, "Pass user_ids=[id of example 0, id of example 1, ...], e.g. the author of "
            "each message.")
    if isinstance(user_ids, (str, bytes)) or not isinstance(user_ids, Sequence) and not hasattr(
            user_ids, "__len__"):
        raise ConfigTypeError(
            f"user_ids must be a sequence with one id per example; got user_ids of type "
            f"{type(user_ids).__name__}. Pass a list, tuple, NumPy array or tensor of ids.")
    ids = user_ids.tolist() if hasattr(user_ids, "tolist") else list(user_ids)
    if len(ids) != num_records:
        raise _validate.fail(
            f"user_ids must have one id per example of the data set ({num_records})",
            "len(user_ids)", len(ids), "Pass the id of every example, in the data set's order.")
    numbers: dict = {}
    owner = np.empty(len(ids), dtype=np.int64)
    for i, uid in enumerate(ids):
        if uid is None or not isinstance(uid, Hashable):
            raise ConfigTypeError(
                f"every user id must be hashable and not None; got user_ids[{i}]={uid!r}. Pass "
                f"ids such as ints or strings (a tensor's ids: user_ids=tensor.tolist()).")
        owner[i] = numbers.setdefault(uid, len(numbers))
    order = np.argsort(owner, kind="stable")
    bounds = np.cumsum(np.bincount(owner, minlength=len(numbers)))[:-1]
    return owner, np.split(order, bounds)


class _UserRows:
    """What a sampler over users adds to the sampler of its units (users): the rows of each
    drawn user, at most ``k`` of them, chosen afresh at every step, and the note of whose each
    row is."""

    def _take_rows(self, rows: list[np.ndarray], max_examples_per_user: int) -> None:
        self.rows = rows
        self.k = max_examples_per_user
        self.notes: deque[np.ndarray] = deque()

    def sample(self) -> np.ndarray:
        step = self.step
        users = super().sample()
        parts, owners = [], []
        for u in users.tolist():
            rows = self.rows[u]
            if len(rows) > self.k:  # k of them, uniformly without replacement
                words = self.bits(len(rows), _CHOICE_KEY + step * 2**31 + u)
                rows = np.sort(rows[np.argsort(words, kind="stable")[: self.k]])
            parts.append(rows)
            owners.append(np.full(len(rows), u, dtype=np.int64))
        self.notes.append(np.concatenate(owners) if owners else np.empty(0, dtype=np.int64))
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


class UserSampler(_UserRows, PoissonSampler):
    """Yields one index array per step: each user's rows (at most ``k``) when it is sampled.

    Args:
        rows: the rows (record indices) of each user.
        sample_rate: ``q``, the probability that a user takes part in a step.
        max_examples_per_user: ``k``.
        bits: as for [`PoissonSampler`][privgrad.sampling.poisson.PoissonSampler].
        steps: as for [`PoissonSampler`][privgrad.sampling.poisson.PoissonSampler].

    Attributes:
        step: steps sampled so far (with the seed, what a resumed run needs).
        notes: the user of each row of the batches sampled and not yet delivered, oldest first
            (the loader's ``DrawnUsers`` takes them in step).
    """

    def __init__(self, rows: list[np.ndarray], sample_rate: float, max_examples_per_user: int,
                 *, bits: Bits, steps: int | None = None):
        super().__init__(len(rows), sample_rate, bits=bits, steps=steps)
        self._take_rows(rows, max_examples_per_user)


class CyclicUserSampler(_UserRows, CyclicPoissonSampler):
    """Yields one index array per step: the rows (at most ``k`` a user) of the users that
    cyclic Poisson sampling over users draws (step ``t``: each user of group ``t mod b`` with
    probability ``sample_rate``).

    Args:
        rows: the rows (record indices) of each user.
        sample_rate: ``p``, the probability that a user of the step's group takes part.
        max_examples_per_user: ``k``.
        num_groups: ``b``, at most the number of users.
        bits: as for [`CyclicPoissonSampler`][privgrad.sampling.cyclic.CyclicPoissonSampler].
        group_key: the secret key of the users' groups.
        steps: steps per epoch (default ``round(b / p)``).

    Privacy:
        The users drawn at each step are exactly ``CyclicPoissonSampler``'s draw over the ``U``
        users (the same words, key and groups): a user takes part in at most one of any ``b``
        consecutive steps, which is what the mechanism's event assumes of its unit.
    """

    def __init__(self, rows: list[np.ndarray], sample_rate: float, max_examples_per_user: int,
                 num_groups: int, *, bits: Bits, group_key: int, steps: int | None = None):
        super().__init__(len(rows), sample_rate, num_groups, bits=bits, group_key=group_key,
                         steps=steps)
        self._take_rows(rows, max_examples_per_user)


class DrawnUsers(DrawnBatches):
    """``DrawnBatches`` whose note on each batch is the user of each of its rows
    (``units(number)``); a new pass abandons the batches no step released."""

    LATEST_ONLY = True

    def units(self, number: int) -> np.ndarray | None:
        """The user of each row of batch ``number`` (``None`` if it was not yielded or is too
        old)."""
        return self.note(number)


@dataclass(frozen=True)
class UserPlan(SamplingPlan):
    """A [`SamplingPlan`][privgrad.sampling.plan.SamplingPlan] over users.

    Attributes:
        num_users: ``U``.
        max_examples_per_user: ``k``.
        rows: the record indices of each user.
    """

    num_users: int = 0
    max_examples_per_user: int = 1
    rows: list = field(default_factory=list, repr=False, compare=False)

    privacy_unit = "user"

    @property
    def units(self) -> int:
        """The number of privacy units: users."""
        return self.num_users

    def loader(self, data_loader, *, seed: int, secure: bool, ranks=None, group_key=None):
        """``(sampler, drawn, loader)`` as for the example-level plan, over users."""
        if ranks is not None:
            raise ConfigError(
                "privacy_unit='user' runs in one process for now; got a data-parallel job. Each "
                "rank would clip its share of a user's rows on its own. Pass distributed=False, "
                "or privacy_unit='example'.")
        bits = os_bits if secure else numpy_bits(seed)
        if self.num_groups > 1:  # a correlated-noise mechanism: cyclic over users
            sampler = CyclicUserSampler(self.rows, self.sample_rate, self.max_examples_per_user,
                                        self.num_groups, bits=bits, group_key=group_key,
                                        steps=self.steps_per_epoch)
        else:
            sampler = UserSampler(self.rows, self.sample_rate, self.max_examples_per_user,
                                  bits=bits, steps=self.steps_per_epoch)
        drawn = DrawnUsers(sampler)
        loader = poisson_loader(data_loader, sampler, drawn)
        loader.sampling = self
        return sampler, drawn, loader


def user_plan(base: SamplingPlan, data_loader, *, user_ids, max_examples_per_user,
              sample_rate=None, expected_batch_size=None, poisson_sampling=True) -> UserPlan:
    """The user-level plan: ``q = batch_size / R`` with ``R = sum_u min(n_u, k)`` (the loader's
    ``batch_size`` stays the expected number of rows a batch), or the declared ``sample_rate``
    and ``expected_batch_size``."""
    k = _validate.positive_int(
        "max_examples_per_user", max_examples_per_user,
        "Pass how many examples one user may contribute to a step, e.g. 8.")
    if not poisson_sampling:
        raise _validate.fail(
            "privacy_unit='user' needs privgrad's user-level Poisson sampling",
            "poisson_sampling", False, "Pass poisson_sampling=True: a loader of your own can "
            "split a user's rows across steps, and the accounting assumes Poisson sampling of "
            "users.")
    _, rows = user_index(user_ids, base.dataset_size)
    capped = int(sum(min(len(r), k) for r in rows))
    b = base.num_groups  # > 1: a correlated mechanism's cyclic sampling, now over users
    if b > len(rows):
        raise _validate.fail(
            f"the sampling groups must not outnumber the users ({len(rows)})", "num_groups", b,
            "Pass fewer bands (BandMF) or a smaller min_sep (BLT), or train on more users.")
    if sample_rate is None:
        batch_size = data_loader.batch_size
        if batch_size > capped:
            raise _validate.fail(
                f"batch_size must be at most the rows users can contribute ({capped} with "
                f"max_examples_per_user={k})", "batch_size", batch_size,
                f"Use a batch size <= {capped}, or raise max_examples_per_user.")
        q, expected = batch_size / capped, float(batch_size)
        if q * b > 1:
            raise _validate.fail(
                f"batch_size * num_groups must be at most the rows users can contribute "
                f"({capped} with max_examples_per_user={k}): each group of users is sampled at "
                f"rate batch_size * num_groups / {capped}", "batch_size", batch_size,
                f"Use a batch size <= {capped // b}, fewer bands or a smaller min_sep, or raise "
                f"max_examples_per_user.")
    else:  # declared: the number of users and their rows stay private
        q = base.base_rate
        expected = float(expected_batch_size) if expected_batch_size is not None else q * capped
    return UserPlan(base.dataset_size, q * b, expected, True, b, num_users=len(rows),
                    max_examples_per_user=k, rows=rows)


def owners_of(drawn):
    """``() -> the user of each row of the batch just yielded`` for user-level loaders' records
    (``DrawnUsers``), else ``None`` (for ``VirtualBatches``: chunks that never split a user)."""
    if not isinstance(drawn, DrawnUsers):
        return None
    return lambda: drawn.units(drawn.delivered)


class _Shown(str):
    """A value shown as is in an error message (not quoted)."""

    def __repr__(self) -> str:
        return str(self)


def unit_settings(plan: SamplingPlan) -> dict:
    """The privacy settings a plan adds (``PrivacySettings`` fields)."""
    if isinstance(plan, UserPlan):
        return {"privacy_unit": "user", "max_examples_per_user": plan.max_examples_per_user}
    return {"max_batch_size": getattr(plan, "max_batch_size", None)}


def resolve(plan: SamplingPlan, data_loader, *, privacy_unit="example", user_ids=None,
            max_examples_per_user=None, clipping="flat", sample_rate=None,
            expected_batch_size=None, poisson_sampling=True) -> SamplingPlan:
    """``plan`` for ``privacy_unit="example"``; the user-level plan for ``"user"``. Refuses
    user arguments without ``privacy_unit="user"`` (a run that silently stayed example-level
    would report a per-row epsilon as if it protected people)."""
    unit = _validate.choice("privacy_unit", privacy_unit, UNITS)
    if unit == "example":
        given = [(name, value) for name, value in (("user_ids", user_ids), (
            "max_examples_per_user", max_examples_per_user)) if value is not None]
        if given:
            name, value = given[0]
            if name == "user_ids" and hasattr(value, "__len__"):
                value = _Shown(f"<{type(value).__name__} of {len(value)} ids>")
            raise _validate.fail(
                f"{name} needs privacy_unit='user'", name, value,
                "Pass privacy_unit='user' to protect users (with user_ids= and "
                "max_examples_per_user=), or drop it for example-level privacy.")
        return plan
    if clipping in ("adaptive", "per_layer_adaptive"):
        raise _validate.fail(
            "privacy_unit='user' supports clipping 'flat', 'per_layer' and 'automatic'",
            "clipping", clipping, "Pass clipping='flat' (adaptive clipping's count is per "
            "example so far).")
    if max_examples_per_user is None:
        raise _validate.fail(
            "privacy_unit='user' needs max_examples_per_user", "max_examples_per_user", None,
            "Pass how many examples one user may contribute to a step, e.g. 8.")
    return user_plan(plan, data_loader, user_ids=user_ids,
                     max_examples_per_user=max_examples_per_user, sample_rate=sample_rate,
                     expected_batch_size=expected_batch_size, poisson_sampling=poisson_sampling)


#: The arguments of make_private that only the sampling takes (``refine()``).
SAMPLING_ONLY = ("privacy_unit", "user_ids", "max_examples_per_user", "max_batch_size")


def refine(planned: tuple, data_loader, epochs=None, *, clipping="flat", sample_rate=None,
           expected_batch_size=None, poisson_sampling=True, privacy_unit="example",
           user_ids=None, max_examples_per_user=None, max_batch_size=None, group_key=None,
           **_) -> tuple:
    """``(mechanism, plan, planned steps)`` (``privgrad.mechanism_run.plan()``'s) over users
    and/or truncated, as ``make_private``'s arguments ask (validated once). The steps of
    ``epochs`` epochs follow the new plan's epoch. ``group_key()`` draws the groups of a
    truncated cyclic plan (their sizes enter its accounting)."""
    from privgrad.sampling.truncated import truncated_plan

    mechanism, base, steps = planned
    if base.num_groups > 1 and max_batch_size is not None and not mechanism.amplified:
        raise _validate.fail(
            "max_batch_size works with DP-SGD and BandMF (their accounting is per step, where "
            "a truncated step has its own event)", "mechanism", mechanism,
            "Pass mechanism=BandMF(num_bands=b), or drop max_batch_size: this mechanism's "
            "event covers the whole run without amplification, and a record that displaces "
            "another in a cut batch doubles its sensitivity.")
    chosen = resolve(base, data_loader, privacy_unit=privacy_unit, user_ids=user_ids,
                     max_examples_per_user=max_examples_per_user, clipping=clipping,
                     sample_rate=sample_rate, expected_batch_size=expected_batch_size,
                     poisson_sampling=poisson_sampling)
    if max_batch_size is not None:
        if isinstance(chosen, UserPlan):
            raise _validate.fail(
                "max_batch_size works with privacy_unit='example' for now", "privacy_unit",
                "user", "Drop max_batch_size (user-level batches keep their Poisson size), or "
                "use privacy_unit='example'.")
        chosen = truncated_plan(chosen, max_batch_size, group_key)
    if chosen is base:
        return planned
    return mechanism, chosen, (steps if epochs is None else epochs * chosen.steps_per_epoch)
