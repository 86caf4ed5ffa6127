"""``opacus.layers`` on privgrad: the ``DP*`` layers are the ``torch.nn`` layers themselves.

Opacus rebuilds recurrent layers and multi-head attention out of ``Linear`` pieces so that its
hooks can see them. privgrad has exact per-sample rules for ``nn.LSTM``, ``nn.GRU``, ``nn.RNN``
and ``nn.MultiheadAttention`` (``privgrad.layers``), so each ``DP*`` class here is a subclass
that adds nothing: the rule registry serves a subclass that keeps its base's ``forward``.

Differences from Opacus 1.6.0 (stated in docs/migration.md):

- ``state_dict()`` keys are torch's (``weight_ih_l0``, ``in_proj_weight``, ``out_proj.weight``...),
  which are also the keys Opacus writes (it renames its pieces' parameters on save), so a state
  dict saved from an Opacus ``DP*`` layer loads here and into the plain ``torch.nn`` layer.
- Parameter *order* is torch's (``weight_ih, weight_hh, bias_ih, bias_hh`` per layer; Opacus:
  ``weight_ih, bias_ih, weight_hh, bias_hh``), and ``DPMultiheadAttention.named_parameters()``
  gives torch's names (``in_proj_weight``; Opacus: ``qlinear.weight``...). Both matter only for
  an *optimizer* state dict saved under Opacus (it is keyed by position) and for per-layer
  ``max_grad_norm`` lists: build those from this model's own ``named_parameters()``.
- The initial state goes in as torch's second positional argument or ``hx=`` (Opacus also
  names it ``state_init=``).

>>> from privgrad.opacus.layers import DPLSTM
>>> lstm = DPLSTM(8, 16, batch_first=True)    # an nn.LSTM in every respect
"""

from __future__ import annotations

from torch import nn

__all__ = ["DPGRU", "DPLSTM", "DPMultiheadAttention", "DPRNN"]


class DPLSTM(nn.LSTM):
    """``torch.nn.LSTM`` under Opacus's name (same arguments, parameters and ``forward``).

    Privacy:
        Served by privgrad's exact recurrent rule, which knows the layer's own batch dimension
        (``batch_first``); see ``privgrad.layers.rnn``.
    """


class DPGRU(nn.GRU):
    """``torch.nn.GRU`` under Opacus's name (same arguments, parameters and ``forward``).

    Privacy:
        Served by privgrad's exact recurrent rule; see ``privgrad.layers.rnn``.
    """


class DPRNN(nn.RNN):
    """``torch.nn.RNN`` under Opacus's name (``nonlinearity="tanh"`` or ``"relu"``).

    Privacy:
        Served by privgrad's exact recurrent rule; see ``privgrad.layers.rnn``.
    """


class DPMultiheadAttention(nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` under Opacus's name (same arguments and ``forward``).

    Privacy:
        Served by privgrad's exact attention rule; ``privgrad.validate`` reports attention
        dropout and sequence-first use that the rule cannot serve (see
        ``privgrad.layers.attention``).
    """
