"""Normalisation layers with an affine part: ``LayerNorm``, ``GroupNorm``, ``InstanceNorm1d/2d/3d``,
``RMSNorm``.

Each normalises one example on its own, so its per-sample gradient is exact: recompute the
normalised input ``n`` with the layer's own functional (same numerics as the forward pass), then
``dL/dweight_b = sum over positions of G_b * n_b`` and ``dL/dbias_b = sum over positions of G_b``.
These per-sample gradients are as small as the parameters, so materialising them is the cheapest
exact method and the rules have no ghost norm. (BatchNorm mixes examples and is refused by the
validator instead.)

Index letters: ``b`` example; the remaining dimensions are summed over except those the
parameter spans.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from privgrad.layers.base import Capture, LayerRule
from privgrad.layers.speed import SpeedHooks


class _AffineNormRule(SpeedHooks, LayerRule):
    """Shared shape logic: the parameter spans ``param_dims`` of the activation."""

    materializes_early = True

    def normalized(self, module, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _reduce(self, module, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` (same shape as the activation) down to ``(b, *param.shape)``."""
        raise NotImplementedError

    def per_sample_gradients(self, module, capture: Capture, names):
        g = capture.grad_output
        out = {}
        if "weight" in names:
            n = self.normalized(module, capture.activation).to(g.dtype)
            out["weight"] = self._reduce(module, g * n)
        if "bias" in names:
            out["bias"] = self._reduce(module, g)
        return out


class _LastDimsRule(_AffineNormRule):
    """Parameters span the trailing ``normalized_shape`` dimensions (LayerNorm, RMSNorm)."""

    stacks_examples = True  # a sum over positions: users stack (privgrad.engine.groups)

    def _reduce(self, module, t):
        k = len(module.normalized_shape)
        if t.dim() == k + 1:
            return t
        return t.flatten(1, t.dim() - k - 1).sum(1)


class LayerNormRule(_LastDimsRule):
    """Rule for ``nn.LayerNorm``."""

    def normalized(self, module, x):
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)


class RMSNormRule(_LastDimsRule):
    """Rule for ``nn.RMSNorm``."""

    def normalized(self, module, x):
        return F.rms_norm(x, module.normalized_shape, None, module.eps)


class _ChannelRule(_AffineNormRule):
    """Parameters span the channel dimension 1 (GroupNorm, InstanceNorm).

    Where the statistics come from the input itself (every GroupNorm; InstanceNorm in training
    mode or without running statistics) the per-sample gradients come from the layer's own
    backward kernel with the batch folded into the groups: the input seen as one example of
    ``B * C`` channels in ``B * groups`` groups normalises exactly as before, and its weight and
    bias gradients are the per-sample ones, without writing the normalised input or its product
    with the output gradient (two activation-sized temporaries).
    """

    def _reduce(self, module, t):
        return t.flatten(2).sum(-1) if t.dim() > 2 else t

    def groups(self, module) -> int | None:
        """Number of groups normalised together, or ``None`` for fixed (running) statistics."""
        raise NotImplementedError

    def per_sample_gradients(self, module, capture: Capture, names):
        x, g, groups = capture.activation, capture.grad_output, self.groups(module)
        b, c = x.shape[:2]
        positions = x[0, 0].numel() if b and c else 0
        if groups is None or not positions:
            return super().per_sample_gradients(module, capture, names)
        folded = x.reshape(1, b * c, positions)
        kept = capture.scratch.get("group_stats")  # the forward's own (keep_from_forward)
        if kept is not None and all(t.shape == (b, groups) and t.dtype == x.dtype
                                    and t.device == x.device for t in kept):
            mean, rstd = (t.reshape(1, b * groups) for t in kept)
        else:
            _, mean, rstd = torch.ops.aten.native_group_norm(
                folded, None, None, 1, b * c, positions, b * groups, module.eps)
        ones = folded.new_ones(b * c)  # the affine weight enters the input gradient only
        _, weight, bias = torch.ops.aten.native_group_norm_backward(
            g.to(x.dtype).reshape(1, b * c, positions), folded, mean, rstd, ones, 1, b * c,
            positions, b * groups, [False, "weight" in names, "bias" in names])
        out = {}
        if "weight" in names:
            out["weight"] = weight.view(b, c).to(g.dtype)
        if "bias" in names:
            out["bias"] = bias.view(b, c).to(g.dtype)
        return out


class GroupNormRule(_ChannelRule):
    """Rule for ``nn.GroupNorm``.

    The per-group mean and reciprocal standard deviation of the forward pass are read from its
    autograd node (``keep_from_forward``: the same kernel on the same input gives them bit for
    bit) instead of normalising the input a second time, which cost as much as the layer's
    forward (4.1 ms against 3.1 for 64 x 32 x 32 x 32 on one CPU thread).
    """

    def groups(self, module):
        return module.num_groups

    def keep_from_forward(self, module, outputs, scratch):
        node = outputs[0].grad_fn if len(outputs) == 1 else None
        if type(node).__name__ == "NativeGroupNormBackward0":  # else recomputed
            scratch["group_stats"] = (node._saved_result1, node._saved_result2)

    def normalized(self, module, x):
        return F.group_norm(x, module.num_groups, None, None, module.eps)


class InstanceNormRule(_ChannelRule):
    """Rule for ``nn.InstanceNorm1d/2d/3d`` with ``affine=True``.

    Privacy:
        With ``track_running_stats=True`` in training mode the layer's running statistics learn
        from private data and are saved with the model; the validator refuses that. In eval mode
        the running statistics (fixed) are used, as in the forward pass.
    """

    def batch_size(self, module, args, kwargs) -> int:
        x = args[0]
        if x.dim() == module._get_no_batch_dim():
            from privgrad.errors import UnsupportedModuleError

            raise UnsupportedModuleError(
                f"{type(module).__name__} needs a batch dimension; got an input of shape "
                f"{tuple(x.shape)}. Add the batch dimension (x.unsqueeze(0)).")
        return int(x.shape[0])

    def groups(self, module):
        use_input_stats = module.training or not module.track_running_stats
        return module.num_features if use_input_stats else None

    def normalized(self, module, x):
        if self.groups(module) is not None:
            return F.instance_norm(x, None, None, None, None, True, 0.0, module.eps)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean, var = module.running_mean.view(shape), module.running_var.view(shape)
        return (x - mean) / torch.sqrt(var + module.eps)

