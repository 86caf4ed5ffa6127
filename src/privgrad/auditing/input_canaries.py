"""Black-box input canaries: ordinary examples, trained on by the user's own loop, scored by loss.

``m`` canaries are examples in the form of the user's records (for instance records of the data
set with a wrong label,
[`mislabeled_canaries()`][privgrad.auditing.input_canaries.mislabeled_canaries]). Each is put in the
training set with probability 1/2, independently, from the canaries' own seed. Training is the
user's ordinary private loop: the canaries are plain records of the data set, so no hook, loss or
model change is needed. After training, each canary is scored by its loss under the final model, or
by how much its loss fell from the initial model (when
[`InputCanaries.record_initial_losses()`][privgrad.auditing.input_canaries.InputCanaries.record_initial_losses]
ran before training); the auditor guesses "in" for the highest scores and "out" for the lowest, and
the one-run statistics of ``privgrad.auditing.statistics`` turn the guesses into a lower bound
(``privgrad.auditing.evaluate_scores()``).

    canaries, train_set = mislabeled_canaries(records, 1000, num_classes=10, seed=1)
    data = canaries.dataset(train_set)             # your records, then the included canaries
    loader = DataLoader(data, batch_size=256)      # your own collate_fn, if any, works as is
    module, optimizer, loader = engine.make_private(module=model, optimizer=optimizer,
        data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
        sample_rate=q, expected_batch_size=q * (len(train_set) + 500))
    canaries.record_initial_losses(module)         # optional: score by the loss difference
    for x, y in loader:                            # your ordinary private loop
        ...
    print(canaries.report(engine, delta=1e-5).text())

Privacy:
    The canaries audit the whole training run as the final model shows it, not the mechanism
    alone: a bound above the accountant's epsilon is a privacy bug, wherever it sits. The
    bound is valid because each canary is one record of an add/remove neighbouring data set,
    included by an independent fair coin, and the scores depend on the run's outputs only.
    Black-box bounds are far below the white-box ones at the same settings (a model rarely
    memorises one example as much as DP-SGD allows), so a low bound says little.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset, Dataset, Subset
from torch.utils.data.dataloader import default_collate

from privgrad import _validate
from privgrad.auditing.report import AuditReport
from privgrad.auditing.scores import evaluate_scores
from privgrad.auditing.simulation import AuditSettings
from privgrad.errors import ConfigError, PrivacyStateError

__all__ = ["InputCanaries", "cross_entropy_losses", "mislabeled_canaries"]

BLACK_BOX = "black-box input"


def cross_entropy_losses(model: nn.Module, batch) -> torch.Tensor:
    """Per-example cross-entropy of a collated ``(inputs, labels)`` batch (the default loss)."""
    x, y = batch
    device = next((p.device for p in model.parameters()), None)
    out = model(x.to(device) if device is not None else x)
    return F.cross_entropy(out, y.to(out.device), reduction="none")


def _seed_sequence(seed) -> np.random.SeedSequence:
    return seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)


class InputCanaries:
    """``m`` black-box input canaries, each in the training set with probability 1/2.

    Args:
        examples: the ``m`` canary examples, a sequence (a list or map-style data set) in the
            form of the user's records, e.g. ``(input, label)`` pairs.
        seed: seed of the inclusion draws (an int, a ``numpy.random.SeedSequence`` or ``None``
            for fresh entropy). Use a different seed (or a spawned child) for anything else.
        loss_fn: ``loss_fn(model, batch) -> (B,)`` per-example losses of a collated batch of
            canaries (default ``cross_entropy_losses()``).
        collate_fn: collates canary examples into a batch (default PyTorch's
            ``default_collate``).
        batch_size: canaries per forward pass when scoring.

    Attributes:
        included: ``(m,)`` bool, whether each canary is in the training set.
        initial_losses: ``(m,)`` losses under the initial model, or ``None`` if not recorded.
    """

    def __init__(self, examples: Sequence, *, seed=None,
                 loss_fn: Callable[[nn.Module, object], torch.Tensor] | None = None,
                 collate_fn: Callable[[list], object] | None = None, batch_size: int = 1024):
        m = _validate.positive_int("len(examples)", len(examples),
                                   "Pass at least one canary example.")
        self.examples = examples
        self.loss_fn = loss_fn if loss_fn is not None else cross_entropy_losses
        self.collate_fn = collate_fn if collate_fn is not None else default_collate
        self.batch_size = _validate.positive_int("batch_size", batch_size, "Pass e.g. 1024.")
        self.included = np.random.default_rng(_seed_sequence(seed)).random(m) < 0.5
        self.initial_losses: np.ndarray | None = None

    @property
    def num_canaries(self) -> int:
        return int(self.included.shape[0])

    @property
    def score_name(self) -> str:
        """How [`scores()`][privgrad.auditing.input_canaries.InputCanaries.scores] scores the
        canaries, in words (for the report)."""
        if self.initial_losses is None:
            return "negative loss under the final model"
        return "loss decrease from the initial model"

    def dataset(self, records: Dataset) -> ConcatDataset:
        """The user's ``records`` followed by the included canaries, as plain examples."""
        if not hasattr(records, "__len__") or not hasattr(records, "__getitem__"):
            raise _validate.fail("records must be a map-style data set (len and indexing)",
                                 "records", type(records).__name__,
                                 "Pass a torch.utils.data.Dataset such as a TensorDataset.")
        return ConcatDataset([records, Subset(self.examples, np.flatnonzero(self.included))])

    def losses(self, model: nn.Module) -> np.ndarray:
        """``(m,)`` float64 loss of every canary under ``model`` (in eval mode, no gradients).

        A non-finite loss counts as ``+inf`` (the canary is not fitted at all). The model's
        training mode is restored afterwards.
        """
        if not isinstance(model, nn.Module):
            raise _validate.fail("model must be a torch.nn.Module", "model",
                                 type(model).__name__, "Pass the trained model.")
        m, out = self.num_canaries, []
        training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for start in range(0, m, self.batch_size):
                    stop = min(m, start + self.batch_size)
                    batch = self.collate_fn([self.examples[i] for i in range(start, stop)])
                    loss = torch.as_tensor(self.loss_fn(model, batch))
                    if loss.shape != (stop - start,):
                        raise ConfigError(
                            f"loss_fn must return one loss per example; got loss_fn(...).shape="
                            f"{tuple(loss.shape)} for {stop - start} canaries. Return the "
                            f"per-example losses, e.g. F.cross_entropy(..., reduction='none').")
                    out.append(loss.detach().to(torch.float64).cpu().numpy())
        finally:
            model.train(training)
        values = np.concatenate(out)
        return np.where(np.isfinite(values), values, np.inf)

    def record_initial_losses(self, model: nn.Module) -> None:
        """Record every canary's loss under the initial model, so that
        [`scores()`][privgrad.auditing.input_canaries.InputCanaries.scores] is the loss decrease.
        Call it before the first step (after ``make_private`` is fine)."""
        self.initial_losses = self.losses(model)

    def scores(self, model: nn.Module) -> np.ndarray:
        """``(m,)`` scores, higher for canaries more likely included: the loss decrease from the
        initial model if recorded, else the negative final loss (both finite)."""
        final = self.losses(model)
        start = self.initial_losses if self.initial_losses is not None else np.zeros_like(final)
        score = start - final
        # A canary that blew up (infinite loss) is the least likely member: below every other.
        lowest = np.min(score[np.isfinite(score)], initial=0.0) - 1.0
        return np.where(np.isfinite(score), score, lowest)

    def report(self, engine, *, delta: float, model: nn.Module | None = None,
               confidence: float = 0.95, guesses=None) -> AuditReport:
        """Score the canaries and audit the run so far.

        Args:
            engine: the ``PrivacyEngine`` that trained the model.
            delta: the delta of the accountant's epsilon and of the bound.
            model: the trained model (default ``engine.module``; pass it after ``detach``).
            confidence: confidence of the lower bound.
            guesses: see ``privgrad.auditing.evaluate_scores()`` (default: the best of three
                guess counts, Bonferroni-corrected).

        Returns:
            An [`AuditReport`][privgrad.auditing.report.AuditReport] with
            ``canary_kind="black-box input"``, no band and no conformance tests.

        Privacy:
            Valid for any model the run released and any guesses that do not look at
            ``included``. Runs whose sample rate or batch size depends on how many canaries
            were included leak that count: pass ``sample_rate`` and ``expected_batch_size`` to
            ``make_private``.
        """
        settings = getattr(engine, "settings", None)
        if settings is None or not getattr(engine, "steps", 0):
            raise PrivacyStateError(
                f"canaries.report needs an engine that trained; got engine.steps="
                f"{getattr(engine, 'steps', None)}. Call make_private and train first.")
        model = model if model is not None else engine.module
        if model is None:
            raise PrivacyStateError(
                "canaries.report needs the trained model; got model=None and engine.module=None "
                "(the engine was detached). Pass model=your_model.")
        audit = AuditSettings(self.num_canaries, settings.sample_rate, settings.noise_multiplier,
                              settings.total_bound, engine.steps, delta, confidence)
        return evaluate_scores(self.scores(model), self.included, audit,
                               engine.get_epsilon(delta), guesses=guesses,
                               canary_kind=BLACK_BOX, score=self.score_name)


def mislabeled_canaries(records: Dataset, num_canaries: int, *, num_classes: int, seed=None,
                        loss_fn=None) -> tuple[InputCanaries, Subset]:
    """Canaries made of records with a wrong label; returns them and the records left to train on.

    ``num_canaries`` distinct records are drawn; each gets a label drawn uniformly from the other
    ``num_classes - 1`` classes. The drawn records are held out of the returned training set, so
    a canary's true-label original never trains beside it.

    Args:
        records: a map-style data set of ``(input, label)`` pairs with integer labels.
        num_canaries: ``m``, fewer than ``len(records)``.
        num_classes: the number of classes (at least 2).
        seed: seeds the draw of records and labels and, independently, the inclusion bits.
        loss_fn: see [`InputCanaries`][privgrad.auditing.input_canaries.InputCanaries].

    Returns:
        ``(canaries, remaining_records)``.
    """
    n = len(records)
    m = _validate.positive_int("num_canaries", num_canaries, "Pass e.g. 1000.")
    if m >= n:
        raise _validate.fail(f"num_canaries must be < len(records) = {n}", "num_canaries", m,
                             f"Pass at most {max(1, n // 2)} so that records remain to train on.")
    k = _validate.positive_int("num_classes", num_classes, "Pass the number of classes, e.g. 10.")
    if k < 2:
        raise _validate.fail("num_classes must be >= 2", "num_classes", k,
                             "A wrong label needs at least two classes.")
    draw_seed, inclusion_seed = _seed_sequence(seed).spawn(2)
    rng = np.random.default_rng(draw_seed)
    sources = np.sort(rng.choice(n, size=m, replace=False))
    shifts = rng.integers(1, k, size=m)
    examples = []
    for i, shift in zip(sources, shifts):
        x, y = records[int(i)]
        if not 0 <= int(y) < k:
            raise _validate.fail(f"labels must be in [0, num_classes) = [0, {k})",
                                 f"label of record {int(i)}", int(y),
                                 "Pass the data set's number of classes as num_classes.")
        label = (int(y) + int(shift)) % k
        examples.append((x, torch.tensor(label, dtype=y.dtype) if isinstance(y, torch.Tensor)
                         else label))
    remaining = Subset(records, np.setdiff1d(np.arange(n), sources))
    return InputCanaries(examples, seed=inclusion_seed, loss_fn=loss_fn), remaining
