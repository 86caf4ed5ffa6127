"""``nn.Conv1d``, ``nn.Conv2d``, ``nn.Conv3d``: any stride, dilation, groups and padding
(including ``"same"`` and the non-zero padding modes).

A convolution is a linear layer applied at every output position to the unfolded input patch, so
the Linear formulas apply with ``t`` = output position. Index letters: ``b`` example, ``g``
group, ``l`` output position, ``i`` patch feature (input channels of the group times kernel
elements), ``o`` output channel of the group.

Per-sample weight gradient: ``sum_l G_bgol U_bgil``; ghost norm:
``sum_g sum_{l,m} (U_bgl . U_bgm)(G_bgl . G_bgm)``. The engine picks the cheaper per call
(ghost costs ``B L^2 (i + o)`` per group, materialising ``B L i o``).

Materialising has two exact kernels. The default builds the patches ``U`` (unfold) and
contracts them with ``G`` in one batched matrix product. On CPU, for small channel counts,
the convolution's own weight-gradient kernel is faster: with the batch folded into the groups
(input ``(1, B C_in, ...)``, ``B * groups`` groups) its weight gradient *is* the per-sample
gradients, with no patch tensor. Measured on 2 cores, 3x3 kernels, batch 64, inside a training
step (cold caches, fresh allocations): 32->64 channels at 16x16 3.2-3.6 ms against 8.3-8.9 by
unfold, but 64->64 at 8x8 7.5-10 against 3.6-4.1; alone: 16->32 at 32x32 3.7 against 21.9,
128->128 at 8x8 31 against 22, 3->32 at 32x32 3.9 against 2.7. Hence the rule: at least 8
input channels per group and at most 20,000 weights per group.

A whole per-sample gradient tensor can be many times larger than the layer's activations (64->64
channels at 8x8: 9x the input). The engine keeps it until the clipped sum, so it is materialised
whole only while it is no larger than the call's input plus output gradient (what the capture
holds anyway) or ``CHUNK_MIN_BYTES``, whichever is larger. Beyond that the norms come from
the ghost path: the Gram form where it is cheaper, else per-sample gradients formed a chunk of
examples at a time (each chunk within that same size) and dropped once normed; the clipped sum
is then one weight-gradient kernel. Measured on 2 cores at batch 256, 64->64 at 8x8 (norms and
clipped sum): 30 ms in chunks against 48 ms whole (the whole tensor, 38 MB, is fresh memory each
step), and 187 MB -> about 110 MB of extra peak memory for the benchmark CNN; at batch 64 (9 MB)
whole is faster, 7 ms against 10.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from privgrad.layers.base import Capture, LayerRule, batched_size
from privgrad.layers.linear import linear_ghost_norm_sq
from privgrad.layers.speed import SpeedHooks


def unfold(module: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
    """Input patches of a convolution: ``(b, C_in * prod(kernel), L)``, L = output positions."""
    nd = len(module.kernel_size)
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    pad = module._reversed_padding_repeated_twice
    if any(pad):
        x = F.pad(x, pad, mode=mode)
    b, c = x.shape[:2]
    # Tensor.unfold along each spatial dim: (b, c, *out, *span) views, then keep dilated taps.
    # (Also for 2-d: F.unfold's CPU im2col is about 4x slower than one strided copy.)
    for d in range(nd):
        span = module.dilation[d] * (module.kernel_size[d] - 1) + 1
        x = x.unfold(2 + d, span, module.stride[d])
    taps = tuple(slice(None, None, dil) for dil in module.dilation)
    x = x[(Ellipsis, *taps)]  # (b, c, *out, *kernel)
    out_dims = tuple(range(2, 2 + nd))
    kernel_dims = tuple(range(2 + nd, 2 + 2 * nd))
    x = x.permute(0, 1, *kernel_dims, *out_dims)
    length = math.prod(x.shape[2 + nd:])  # output positions, now last
    return x.reshape(b, c * math.prod(module.kernel_size), length)


_INPUT_GRAD = {1: torch.nn.grad.conv1d_input, 2: torch.nn.grad.conv2d_input,
               3: torch.nn.grad.conv3d_input}
_WEIGHT_GRAD = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight,
                3: torch.nn.grad.conv3d_weight}


def symmetric_padding(module: nn.modules.conv._ConvNd) -> tuple[int, ...] | None:
    """The zero padding per spatial dimension when it is the same on both sides of each (what
    the convolution kernels take), else ``None`` (other modes, or asymmetric ``"same"``)."""
    pad = module._reversed_padding_repeated_twice  # (left, right) per dim, last dim first
    if module.padding_mode != "zeros" or any(pad[2 * d] != pad[2 * d + 1]
                                               for d in range(len(pad) // 2)):
        return None
    return tuple(pad[2 * d] for d in reversed(range(len(pad) // 2)))


def _conv_input_grad(module, shape, dtype, padding, g: torch.Tensor) -> torch.Tensor:
    """Gradient of a convolution's input from its output gradient ``g`` (no weight gradient)."""
    grad = _INPUT_GRAD[len(module.kernel_size)](
        shape, module.weight.to(g.dtype), g, module.stride, padding, module.dilation, module.groups)
    return grad.to(dtype)


def conv_weight_sum(module: nn.modules.conv._ConvNd, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``sum_b`` of the per-sample weight gradients for inputs ``x`` and output gradients ``g``:
    the ordinary weight gradient, by the convolution backward kernel (no patches built)."""
    padding = symmetric_padding(module)
    if padding is None:  # pad explicitly, as the module's forward does
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x, padding = F.pad(x, module._reversed_padding_repeated_twice, mode=mode), 0
    return _WEIGHT_GRAD[len(module.kernel_size)](
        x.to(g.dtype), module.weight.shape, g, module.stride, padding, module.dilation,
        module.groups)


def grouped_per_sample_weight(module: nn.modules.conv._ConvNd, x: torch.Tensor,
                              g: torch.Tensor) -> torch.Tensor:
    """Per-sample weight gradients ``(b, *weight.shape)`` by one convolution weight-gradient
    kernel: example ``b``'s channels are groups of their own, so no example's gradient mixes
    with another's."""
    nd = len(module.kernel_size)
    padding = symmetric_padding(module)
    if padding is None:
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x, padding = F.pad(x, module._reversed_padding_repeated_twice, mode=mode), (0,) * nd
    b, shape = x.shape[0], module.weight.shape
    folded_x = x.to(g.dtype).reshape(1, b * x.shape[1], *x.shape[2:])
    folded_g = g.reshape(1, b * g.shape[1], *g.shape[2:])
    weight = g.new_zeros(()).expand(b * shape[0], *shape[1:])  # read for its shape only
    _, grad, _ = torch.ops.aten.convolution_backward(
        folded_g, folded_x, weight, None, list(module.stride), list(padding),
        list(module.dilation), False, [0] * nd, b * module.groups, [False, True, False])
    return grad.view(b, *shape)


CHUNK_MIN_BYTES = 16 << 20  #: per-sample gradients up to this size are never a memory concern


def _grouped_kernel_faster(module: nn.modules.conv._ConvNd, x: torch.Tensor) -> bool:
    """Whether ``grouped_per_sample_weight()`` beats unfold + batched product (CPU
    measurements, see the module docstring; elsewhere unfold, the usual GPU method)."""
    if x.device.type != "cpu":
        return False
    c_in, c_out = module.in_channels // module.groups, module.out_channels // module.groups
    return c_in >= 8 and c_in * math.prod(module.kernel_size) * c_out <= 20_000


class ConvRule(SpeedHooks, LayerRule):
    """Rule for ``nn.Conv1d/2d/3d`` (not transposed convolutions)."""

    materializes_early = True

    has_ghost_norm = True

    def batch_size(self, module, args, kwargs) -> int:
        return batched_size(module, args[0], len(module.kernel_size) + 2)

    def check(self, module: nn.Module) -> str | None:
        if getattr(module, "transposed", False):
            return "transposed convolutions have no dedicated rule"
        return None

    @staticmethod
    def _grouped(module, x: torch.Tensor, g: torch.Tensor):
        """Patches ``(b, g, l, i)`` and output gradients ``(b, g, l, o)`` of input ``x`` and
        output gradient ``g``."""
        groups = module.groups
        u = unfold(module, x)  # (b, C_in*k, L)
        g = g.flatten(2)  # (b, C_out, L)
        b, length = g.shape[0], g.shape[2]
        g = g.reshape(b, groups, g.shape[1] // groups, length).transpose(2, 3)
        u = u.reshape(b, groups, u.shape[1] // groups, length).transpose(2, 3)
        return u, g

    def _per_sample_weight(self, module, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``(b, *weight.shape)`` per-sample weight gradients, by the faster exact kernel."""
        if x.shape[0] == 0:  # an empty Poisson batch (the grouped kernel needs a group)
            return g.new_zeros((0, *module.weight.shape))
        if _grouped_kernel_faster(module, x):
            return grouped_per_sample_weight(module, x, g)
        u, g = self._grouped(module, x, g)
        w = torch.einsum("bglo,bgli->bgoi", g, u.to(g.dtype))
        return w.reshape(g.shape[0], *module.weight.shape)

    def per_sample_gradients(self, module, capture: Capture, names):
        out = {}
        g_full = capture.grad_output
        if "weight" in names:
            out["weight"] = self._per_sample_weight(module, capture.activation, g_full)
        if "bias" in names:
            out["bias"] = g_full.flatten(2).sum(-1)
        return out

    def ghost_norms_sq(self, module, capture: Capture, names):
        g_full = capture.grad_output
        dtype = self.norm_dtype(g_full)
        out = {}
        if "weight" in names:
            if self._gram_cheaper(module, capture):
                u, g = self._grouped(module, capture.activation, g_full)
                b, groups = g.shape[:2]
                flat_u = u.reshape(b * groups, *u.shape[2:])
                flat_g = g.reshape(b * groups, *g.shape[2:])
                out["weight"] = linear_ghost_norm_sq(flat_u, flat_g, dtype).view(b, groups).sum(1)
            else:
                out["weight"] = self._chunked_norms_sq(module, capture, dtype)
        if "bias" in names:
            out["bias"] = self._bias_rows(capture).square().sum(1)
        return out

    def _bias_rows(self, capture: Capture) -> torch.Tensor:
        """Per-sample bias gradients (the output gradient summed over positions), in the norm
        dtype, formed once a call: the ghost norm and the weighted sum both read them."""
        g = capture.grad_output
        return capture.kept("bias_rows", lambda: g.to(self.norm_dtype(g)).flatten(2).sum(-1))

    def _chunked_norms_sq(self, module, capture: Capture, dtype) -> torch.Tensor:
        """Squared per-sample weight-gradient norms, the gradients formed a chunk of examples
        at a time and dropped once normed (see the module docstring)."""
        x, g = capture.activation, capture.grad_output
        b = x.shape[0]
        per_example = module.weight.numel() * g.element_size()
        step = max(1, _budget_bytes(capture) // max(1, per_example))
        norms = [torch.linalg.vector_norm(
                     self._per_sample_weight(module, x[s:s + step], g[s:s + step])
                     .flatten(1).to(dtype), dim=1).square()
                 for s in range(0, b, step)]
        return torch.cat(norms) if norms else g.new_zeros((0,), dtype=dtype)

    def weighted_sum(self, module, capture: Capture, names, weights):
        g_full = capture.grad_output
        w = weights.to(g_full.dtype)
        out = {}
        if "weight" in names:  # the weights scale each example's input or output gradient
            x = capture.activation
            rows = w.view(-1, *([1] * (g_full.dim() - 1)))
            if x.numel() <= g_full.numel():  # whichever is smaller
                out["weight"] = conv_weight_sum(module, x.to(g_full.dtype) * rows, g_full)
            else:
                out["weight"] = conv_weight_sum(module, x, g_full * rows)
        if "bias" in names:
            out["bias"] = w @ self._bias_rows(capture).to(w.dtype)
        return out

    def input_backward(self, module, args, kwargs):
        """``torch.nn.grad.conv*_input`` (a transposed convolution), for zero padding that is
        the same on both sides of every dimension (other paddings keep autograd's backward)."""
        padding = symmetric_padding(module)
        if padding is None or kwargs or len(args) != 1:
            return None
        return partial(_conv_input_grad, module, args[0].shape, args[0].dtype, padding)

    def _sizes(self, module, capture: Capture):
        g = capture.grad_output
        positions = g[0].numel() // max(1, g.shape[1]) if g.shape[0] else 0
        patch = (module.in_channels // module.groups) * math.prod(module.kernel_size)
        return capture.batch_size, module.groups, positions, patch, module.out_channels // module.groups

    def _gram_cheaper(self, module, capture: Capture) -> bool:
        """Whether the Gram form (``L^2 (i + o)`` per group) beats forming per-sample gradients
        (``L i o``) for the norms."""
        _, _, length, i, o = self._sizes(module, capture)
        return length * (i + o) <= i * o

    def ghost_cost(self, module, capture: Capture) -> float:
        """The cheaper exact norm without a whole per-sample tensor: Gram form or chunks."""
        b, groups, length, i, o = self._sizes(module, capture)
        per_group = length * (i + o) if self._gram_cheaper(module, capture) else i * o
        return float(b * groups * length * per_group)

    def materialize_cost(self, module, capture: Capture) -> float:
        """Forming the per-sample gradients, where the whole tensor fits ``_budget_bytes()``;
        beyond that, never chosen by the cost model (memory)."""
        b, groups, length, i, o = self._sizes(module, capture)
        if b * module.weight.numel() * capture.grad_output.element_size() > _budget_bytes(capture):
            return math.inf
        return float(b * groups * length * i * o)


def _budget_bytes(capture: Capture) -> int:
    """The most bytes of per-sample gradients to hold at once: the call's input and output
    gradient (what the capture holds until the step anyway), or ``CHUNK_MIN_BYTES``."""
    x, g = capture.activation, capture.grad_output
    return max(CHUNK_MIN_BYTES, x.numel() * x.element_size() + g.numel() * g.element_size())
