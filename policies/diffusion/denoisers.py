"""Denoisers for action chunks: `(x_t (B, H, A), t (B,), cond (B, C)) -> (B, H, A)`.

`ConditionalUnet1D` is the diffusion_policy standard: a 1-D temporal U-Net over the chunk with the
observation features and the timestep injected into every residual block by FiLM (a per-channel
scale and bias). `MlpDenoiser` flattens the chunk, as DPPO does for state tasks: far cheaper on a CPU.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class SinusoidalEmbedding(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / (half - 1))
        angles = t.float()[:, None] * freqs[None]
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


def timestep_mlp(dim: int) -> nn.Sequential:
    return nn.Sequential(SinusoidalEmbedding(dim), nn.Linear(dim, dim * 4), nn.Mish(), nn.Linear(dim * 4, dim))


class ConvBlock(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, kernel: int, groups: int):
        super().__init__(nn.Conv1d(c_in, c_out, kernel, padding=kernel // 2), nn.GroupNorm(groups, c_out), nn.Mish())


class FiLMResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, cond_dim: int, kernel: int, groups: int):
        super().__init__()
        self.block1 = ConvBlock(c_in, c_out, kernel, groups)
        self.block2 = ConvBlock(c_out, c_out, kernel, groups)
        self.film = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, 2 * c_out))
        self.skip = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, bias = self.film(cond).unsqueeze(-1).chunk(2, dim=1)
        h = self.block1(x) * scale + bias
        return self.block2(h) + self.skip(x)


class ConditionalUnet1D(nn.Module):
    def __init__(self, action_dim: int, cond_dim: int, dims: tuple[int, ...] = (64, 128, 256), kernel: int = 5, groups: int = 8, time_dim: int = 64):
        super().__init__()
        self.time = timestep_mlp(time_dim)
        c = time_dim + cond_dim
        chans = [action_dim, *dims]
        self.down = nn.ModuleList()
        for i, (a, b) in enumerate(zip(chans[:-1], chans[1:])):
            last = i == len(dims) - 1
            self.down.append(nn.ModuleList([
                FiLMResBlock(a, b, c, kernel, groups), FiLMResBlock(b, b, c, kernel, groups),
                nn.Conv1d(b, b, 3, stride=2, padding=1) if not last else nn.Identity(),
            ]))
        self.mid = nn.ModuleList([FiLMResBlock(dims[-1], dims[-1], c, kernel, groups) for _ in range(2)])
        self.up = nn.ModuleList()
        for a, b in zip(reversed(dims[1:]), reversed(dims[:-1])):
            self.up.append(nn.ModuleList([
                FiLMResBlock(2 * a, b, c, kernel, groups), FiLMResBlock(b, b, c, kernel, groups),
                nn.ConvTranspose1d(b, b, 4, stride=2, padding=1),
            ]))
        self.out = nn.Sequential(ConvBlock(dims[0], dims[0], kernel, groups), nn.Conv1d(dims[0], action_dim, 1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        """`temb`: self.time(t) when the caller already has it (a fixed timestep)."""
        c = torch.cat([self.time(t) if temb is None else temb, cond], dim=-1)
        h = x.transpose(1, 2)  # (B, A, H): convolve over time
        skips = []
        for res1, res2, down in self.down:
            h = res2(res1(h, c), c)
            skips.append(h)
            h = down(h)
        for res in self.mid:
            h = res(h, c)
        for res1, res2, up in self.up:
            h = torch.cat([h, skips.pop()], dim=1)
            h = up(res2(res1(h, c), c))
        return self.out(h).transpose(1, 2)


class MlpDenoiser(nn.Module):
    def __init__(self, action_dim: int, horizon: int, cond_dim: int, hidden: tuple[int, ...] = (512, 512, 512), time_dim: int = 32):
        super().__init__()
        self.time = timestep_mlp(time_dim)
        layers: list[nn.Module] = []
        width = action_dim * horizon + time_dim + cond_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.Mish()]
            width = h
        layers.append(nn.Linear(width, action_dim * horizon))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        """`temb`: self.time(t) when the caller already has it (a fixed timestep)."""
        inp = torch.cat([x.flatten(1), self.time(t) if temb is None else temb, cond], dim=-1)
        return self.net(inp).view_as(x)
