"""The one rule for the precision of privacy arithmetic: norms, clipped sums and noise are
formed in float32 or wider, whatever the parameters' dtype (half-precision parameters get float32
sums and noise, then the result is cast back)."""

from __future__ import annotations

import torch

__all__ = ["accumulation_dtype"]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """``dtype`` if it is float32 or float64, else its promotion with float32."""
    if dtype in (torch.float32, torch.float64):
        return dtype
    return torch.promote_types(dtype, torch.float32)
