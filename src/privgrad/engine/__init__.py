"""The per-sample gradient engine: capture each layer's inputs and output gradients once
(``capture``), then per-sample norms, gradients and weighted sums by the layer rules
(``batch``), the clipped sum of a step (``clipped_sum``), and the run-time guards (``guard``,
``selfcheck``, ``rows``); ``functional`` is the entry point for custom loops."""

from privgrad.engine.batch import MODES, BackwardBatch
from privgrad.engine.capture import Recorder
from privgrad.engine.clipped_sum import ClippedSum, StepStats
from privgrad.engine.functional import PerSampleGradients, per_sample_gradients, private_step

__all__ = ["MODES", "BackwardBatch", "ClippedSum", "PerSampleGradients", "Recorder", "StepStats",
           "per_sample_gradients", "private_step"]
