"""The strided ``unfold`` used for 2-d convolutions equals ``F.unfold`` (im2col) exactly."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from privgrad.layers.conv import unfold

CASES = [
    (dict(in_channels=1, out_channels=4, kernel_size=8, stride=2, padding=2), (3, 1, 28, 28)),
    (dict(in_channels=3, out_channels=2, kernel_size=(2, 3), stride=(2, 1), dilation=(1, 2)), (2, 3, 7, 9)),
    (dict(in_channels=2, out_channels=2, kernel_size=3, padding=1), (0, 2, 5, 5)),
    (dict(in_channels=2, out_channels=2, kernel_size=3, dilation=2, stride=3), (1, 2, 11, 10)),
]


@pytest.mark.parametrize("kwargs, shape", CASES)
def test_unfold_2d_matches_im2col(kwargs, shape):
    conv = nn.Conv2d(**kwargs)
    x = torch.randn(shape, dtype=torch.float64)
    padded = F.pad(x, conv._reversed_padding_repeated_twice)
    expected = F.unfold(padded, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
    assert torch.equal(unfold(conv, x), expected)
