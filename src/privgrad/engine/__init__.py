"""The per-sample gradient engine: capture each layer's inputs and output gradients once
(``capture``), then per-sample norms, gradients and weighted sums by the layer rules
(``batch``); ``functional`` is the entry point for custom loops."""

from privgrad.engine.batch import MODES, BackwardBatch
from privgrad.engine.capture import Recorder
from privgrad.engine.functional import PerSampleGradients, per_sample_gradients

__all__ = ["MODES", "BackwardBatch", "PerSampleGradients", "Recorder", "per_sample_gradients"]
