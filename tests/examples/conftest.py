"""Tiny stand-ins for the examples' data, written in the real formats, so the smoke tests run the
real loading code without the data packages (and in seconds)."""

import gzip
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
BBC_CLASSES = ("business", "entertainment", "politics", "sports", "tech")


def load_example(name: str):
    """Import examples/<name>.py as a module (examples/ is not a package)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))  # the plot script imports the examples by name
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="session")
def fashion_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fashion")
    rng = np.random.default_rng(0)
    for split, n in (("train", 96), ("t10k", 40)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 60, (n, 28, 28)) + labels[:, None, None] * 19  # learnable
        _idx(d / f"{split}-images-idx3-ubyte.gz", images)
        _idx(d / f"{split}-labels-idx1-ubyte.gz", labels)
    return d


ADULT_NAMES = """| adult.names (abridged, the schema lines as in the original file)
>50K, <=50K.

age: continuous.
workclass: Private, Self-emp-not-inc, Self-emp-inc, Federal-gov, Local-gov, State-gov, Without-pay, Never-worked.
fnlwgt: continuous.
education: Bachelors, Some-college, 11th, HS-grad, Prof-school, Assoc-acdm, Assoc-voc, 9th, 7th-8th, 12th, Masters, 1st-4th, 10th, Doctorate, 5th-6th, Preschool.
education-num: continuous.
marital-status: Married-civ-spouse, Divorced, Never-married, Separated, Widowed, Married-spouse-absent, Married-AF-spouse.
occupation: Tech-support, Craft-repair, Other-service, Sales, Exec-managerial, Prof-specialty, Handlers-cleaners, Machine-op-inspct, Adm-clerical, Farming-fishing, Transport-moving, Priv-house-serv, Protective-serv, Armed-Forces.
relationship: Wife, Own-child, Husband, Not-in-family, Other-relative, Unmarried.
race: White, Asian-Pac-Islander, Amer-Indian-Eskimo, Other, Black.
sex: Female, Male.
capital-gain: continuous.
capital-loss: continuous.
hours-per-week: continuous.
native-country: United-States, Cambodia, England, Puerto-Rico, Canada, Germany.
"""


@pytest.fixture(scope="session")
def adult_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("adult")
    (d / "adult.names").write_text(ADULT_NAMES)
    rng = np.random.default_rng(0)

    def rows(n, test):
        out = []
        for _ in range(n):
            rich = rng.random() < 0.3
            out.append(", ".join([
                str(rng.integers(20, 70)), "Private" if rich else "?", str(rng.integers(20000, 400000)),
                "Masters" if rich else "HS-grad", "14" if rich else "9", "Married-civ-spouse",
                "Exec-managerial" if rich else "Sales", "Husband", "White", "Male",
                str(5000 if rich else 0), "0", "50" if rich else "38", "United-States",
                (">50K" if rich else "<=50K") + ("." if test else "")]))
        return "\n".join(out) + "\n"

    (d / "adult.data").write_text(rows(120, False))
    (d / "adult.test").write_text("|1x3 Cross validator\n" + rows(40, True))
    return d


@pytest.fixture(scope="session")
def bbc_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bbc")
    topics = {"business": "shares market profit bank", "entertainment": "film music award star",
              "politics": "minister election party vote", "sports": "match goal team cup",
              "tech": "software phone internet computer"}
    rng = np.random.default_rng(0)
    for name in BBC_CLASSES:
        (d / name).mkdir()
        words = topics[name].split()
        for i in range(8):
            text = f"Headline {i}\n\n" + " ".join(rng.choice(words + ["the", "a", "said"], 40))
            (d / name / f"{i:03d}.txt").write_text(text)
    return d


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory):
    """A 1-layer BERT with its WordPiece tokenizer, saved like the real package's model folder."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    d = tmp_path_factory.mktemp("encoder")
    words = "shares market profit bank film music award star minister election party vote " \
            "match goal team cup software phone internet computer the a said headline"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words.split(), *map(str, range(10))]
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(d / "vocab.txt")).save_pretrained(d)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)
    BertModel(config).save_pretrained(d)
    return d
