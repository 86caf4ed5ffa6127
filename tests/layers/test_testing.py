"""privgrad.testing.check_rule, the harness the built-in rules are tested with: it passes the
custom rule of docs/custom_layers.md on every shape, and it catches wrong rules (tests that test
the tests), naming the mode, the quantity and the parameter."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from privgrad.layers import LayerRule, RuleRegistry
from privgrad.layers.linear import LinearRule
from privgrad.testing import check_rule

DOC = Path(__file__).resolve().parents[2] / "docs" / "custom_layers.md"


def _doc_example() -> dict:
    """The namespace of the custom rule example of docs/custom_layers.md, run as written."""
    block = next(b for b in re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
                 if "class LayerScaleRule" in b)
    namespace: dict = {}
    exec(compile(block, str(DOC), "exec"), namespace)
    return namespace


DOCS = _doc_example()
LayerScale, LayerScaleRule = DOCS["LayerScale"], DOCS["LayerScaleRule"]


@given(b=st.integers(0, 4), middle=st.lists(st.integers(1, 3), max_size=2),
       d=st.integers(1, 4))
def test_the_documented_custom_rule_is_exact_on_every_shape(b, middle, d):
    torch.manual_seed(b * 10 + d)
    layer = LayerScale(d)
    with torch.no_grad():
        layer.gamma.normal_()
    ref = check_rule(layer, (torch.randn(b, *middle, d),), rule=LayerScaleRule())
    assert set(ref) == {"gamma"} and ref["gamma"].shape == (b, d)


def test_the_documented_custom_rule_inside_a_model_without_the_generic_rule():
    rules = RuleRegistry.default().with_rule(LayerScale, LayerScaleRule()).without_generic()
    model = nn.Sequential(nn.Linear(4, 6), LayerScale(6), nn.Linear(6, 2))
    check_rule(model, (torch.randn(5, 3, 4),), rules=rules)


def test_float32_modules_and_inputs_are_checked_in_float64_on_a_copy():
    layer = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    ref = check_rule(layer, (x,))
    assert ref["weight"].dtype == torch.float64
    assert layer.weight.dtype == torch.float32 and layer.weight.grad is None


# -- wrong rules are caught -------------------------------------------------------------------
class MixesExamples(LayerRule):
    """Every row is the batch's mean gradient: adds up right, mixes the examples."""

    def per_sample_gradients(self, module, capture, names):
        g = torch.einsum("b...d,b...d->bd", capture.grad_output, capture.activation)
        return {"gamma": g.mean(0, keepdim=True).expand_as(g)}


class BreaksOnOneExample(LayerRule):
    """Right on a batch of several, doubled on a batch of one."""

    def per_sample_gradients(self, module, capture, names):
        g = torch.einsum("b...d,b...d->bd", capture.grad_output, capture.activation)
        return {"gamma": g if g.shape[0] != 1 else 2 * g}


class WrongGhostNorm(LinearRule):
    def ghost_norms_sq(self, module, capture, names):
        return {n: 1.1 * sq for n, sq in super().ghost_norms_sq(module, capture, names).items()}


class WrongWeightedSum(LinearRule):
    def weighted_sum(self, module, capture, names, weights):
        sums = super().weighted_sum(module, capture, names, weights)
        return {n: -s if n == "bias" else s for n, s in sums.items()}


class ForgetsTheBias(LinearRule):
    def per_sample_gradients(self, module, capture, names):
        return super().per_sample_gradients(module, capture, tuple(n for n in names if n != "bias"))


WRONG = [
    pytest.param(lambda: LayerScale(3), MixesExamples(), {},
                 r"batch 4, mode 'auto': per-sample squared norm of gamma", id="mixes-examples"),
    pytest.param(lambda: LayerScale(3), BreaksOnOneExample(), {},
                 r"batch 1, mode 'auto': per-sample squared norm of gamma", id="batch-of-one"),
    pytest.param(lambda: nn.Linear(3, 2), WrongGhostNorm(), {"modes": ("ghost",)},
                 r"mode 'ghost': per-sample squared norm of (weight|bias)", id="ghost-norm"),
    pytest.param(lambda: nn.Linear(3, 2), WrongWeightedSum(), {"modes": ("ghost",)},
                 r"mode 'ghost': weighted sum of bias", id="weighted-sum"),
    pytest.param(lambda: nn.Linear(3, 2), ForgetsTheBias(), {"modes": ("materialize",)},
                 r"parameters normed: missing \['bias'\]", id="missing-parameter"),
]


@pytest.mark.parametrize("build,rule,options,message", WRONG)
def test_a_wrong_rule_fails_naming_the_parameter(build, rule, options, message):
    torch.manual_seed(0)
    layer = build()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    with pytest.raises(AssertionError, match=message):
        check_rule(layer, (torch.randn(4, 2, 3),), rule=rule, **options)


def test_a_rule_wrong_only_on_one_example_passes_without_the_small_batches():
    # (so batch_sizes=(0, 1), the default, is what catches it)
    check_rule(LayerScale(3), (torch.randn(4, 2, 3),), rule=BreaksOnOneExample(), batch_sizes=())


def test_importing_needs_neither_pytest_nor_hypothesis():
    code = ("import sys; sys.modules['pytest'] = sys.modules['hypothesis'] = None; "
            "from privgrad.testing import check_rule")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
