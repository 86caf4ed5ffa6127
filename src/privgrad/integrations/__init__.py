"""Glue for the training frameworks people already use; each is an optional extra.

* ``privgrad.integrations.lightning``: ``DPCallback`` for PyTorch Lightning
  (``pip install 'privgrad[lightning]'``).
* ``privgrad.integrations.huggingface``: ``DPTrainer`` for the Hugging Face ``Trainer``
  (``pip install 'privgrad[hf]'``).

Importing this package imports neither framework.
"""
