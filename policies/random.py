"""Uniformly random actions within the action bounds: the floor every trained policy must beat."""

from __future__ import annotations

import torch


class RandomPolicy:
    obs_horizon = 1
    act_horizon = 1

    def __init__(self, low: torch.Tensor, high: torch.Tensor, seed: int = 0):
        self.low, self.high = low, high
        self.generator = torch.Generator(device=low.device).manual_seed(seed)

    def predict_chunk(self, obs: dict[str, torch.Tensor], streams: torch.Tensor | None = None) -> torch.Tensor:
        batch = next(iter(obs.values())).shape[0]
        u = torch.rand((batch, 1, self.low.shape[0]), generator=self.generator, device=self.low.device)
        return self.low + u * (self.high - self.low)
