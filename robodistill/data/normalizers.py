"""Normalizers fitted on the training split and saved inside every model (their buffers are state)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

MODES = ("minmax", "meanstd")


class Normalizer(nn.Module):
    """x -> (x - center) * scale per feature; `minmax` maps the data range to [-1, 1], `meanstd`
    to zero mean and unit variance. Features that barely vary in the data (half-range or std below
    `eps`, e.g. a quaternion component of an object that never tips over) are only centred: scaling
    them up would turn tiny deviations at test time into huge, out-of-distribution inputs."""

    def __init__(self, dim: int, mode: str = "minmax"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"normalizer mode '{mode}' is not one of {MODES}")
        self.mode = mode
        self.register_buffer("center", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    @classmethod
    def fit(cls, data: np.ndarray | torch.Tensor, mode: str = "minmax", eps: float = 1e-2) -> "Normalizer":
        x = torch.as_tensor(np.asarray(data), dtype=torch.float64).reshape(-1, data.shape[-1])
        norm = cls(x.shape[1], mode)
        if mode == "minmax":
            lo, hi = x.min(0).values, x.max(0).values
            center, spread = (hi + lo) / 2, (hi - lo) / 2
        else:
            center, spread = x.mean(0), x.std(0, unbiased=False)
        norm.center.copy_(center.float())
        norm.scale.copy_(torch.where(spread < eps, torch.ones_like(spread), 1 / spread).float())
        return norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.center) * self.scale

    def unnormalize(self, y: torch.Tensor) -> torch.Tensor:
        return torch.addcdiv(self.center, y, self.scale)  # y / scale + center, in one op

    def extra_repr(self) -> str:
        return f"dim={self.center.numel()}, mode={self.mode}"
