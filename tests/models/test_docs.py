"""The one-file custom rule example in docs/custom_layers.md runs and checks itself (the error
messages for unsupported layers point there, so it must stay correct)."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "custom_layers.md"


def test_custom_layer_example_runs_and_its_rule_is_exact():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    example = [b for b in blocks if "class LayerScaleRule" in b]
    assert len(example) == 1
    namespace: dict = {}
    exec(compile(example[0], str(DOC), "exec"), namespace)  # asserts inside
    assert set(namespace["psg"].gradients) == {"0.weight", "0.bias", "1.gamma", "2.weight", "2.bias"}
