"""Observation encoders: a history of observations -> one conditioning vector per sample."""

from __future__ import annotations

import math

import torch
from torch import nn

from robodistill.errors import UserError


class StateEncoder(nn.Module):
    """The (normalized) state history, flattened: (B, T, D) -> (B, T * D)."""

    def __init__(self, state_dim: int, horizon: int):
        super().__init__()
        self.out_dim = state_dim * horizon

    def forward(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        return obs["state"].flatten(1)


def check_image_size(size: int, crop: float, flag: str) -> None:
    """A camera too small for RgbEncoder to be what it is meant to be: its training crop (`crop` of each side) must
    move by a pixel or more (unless crop=1) and keep 9 px or more, which its three stride-2 convolutions reduce to
    2x2 for the average pooling. Smaller ones trained without a word (the pooling takes any size): at 3 px the crop
    is 2 px, one position, pooled from a single feature. Values out of range are EnvConfig's and check_config's to name."""
    if size < 1 or not 0 < crop <= 1:
        return
    # The smallest side whose crop, int(side * crop) as _crop takes it, keeps 9 px: 9 / crop rounded up, moved by one where
    # the float product and quotient round to either side of a whole number. For crop < 1 that crop also moves: side * crop
    # rounds up to side only for the float just below 1 at a power-of-two side, and its smallest side is 10.
    smallest = math.ceil(9 / crop)
    smallest -= int((smallest - 1) * crop) >= 9
    smallest += int(smallest * crop) < 9
    if size < smallest:
        raise UserError(f"{flag}={size} is too small for the policy's camera CNN: use {smallest} or more (64 is typical), so that its "
                        f"policy.crop={crop:g} crop keeps 9 px (2x2 after its stride-2 convolutions){' and can move' if crop < 1 else ''}")


class RgbEncoder(nn.Module):
    """A small CNN per frame (trained from scratch, GroupNorm, global average pooling) whose
    features are joined with the proprioceptive state. Training takes random crops of `crop` of
    the image (the usual augmentation); evaluation takes the centre crop of the same size."""

    def __init__(self, channels: int, state_dim: int, horizon: int, features: int = 64, crop: float = 0.9):
        super().__init__()
        self.crop, self.channels = crop, channels
        self.cnn = nn.Sequential(
            nn.Conv2d(channels, 32, 5, stride=2, padding=2), nn.GroupNorm(8, 32), nn.Mish(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.GroupNorm(8, 64), nn.Mish(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.GroupNorm(16, 128), nn.Mish(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, features),
        )
        self.out_dim = (features + state_dim) * horizon

    def _crop(self, img: torch.Tensor) -> torch.Tensor:
        n, c, h, w = img.shape
        ch, cw = max(1, int(h * self.crop)), max(1, int(w * self.crop))
        if not self.training:
            top, left = (h - ch) // 2, (w - cw) // 2
            return img[..., top : top + ch, left : left + cw]
        # A crop of its own for every image (as diffusion_policy's CropRandomizer): one offset for the whole batch
        # shifted all its images alike, so each gradient step saw the camera moved one way.
        rows = torch.randint(0, h - ch + 1, (n, 1), device=img.device) + torch.arange(ch, device=img.device)
        cols = torch.randint(0, w - cw + 1, (n, 1), device=img.device) + torch.arange(cw, device=img.device)
        index = torch.arange(n, device=img.device)[:, None, None, None], torch.arange(c, device=img.device)[None, :, None, None]
        return img[(*index, rows[:, None, :, None], cols[:, None, None, :])]

    def forward(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        rgb = obs["rgb"]  # (B, T, H, W, C) uint8
        # A float image would be divided by 255 again (a black frame) and a channel-first one fail deep in a convolution.
        if rgb.dtype != torch.uint8 or rgb.ndim != 5 or rgb.shape[-1] != self.channels:
            raise UserError(f"obs['rgb'] is {rgb.dtype} {tuple(rgb.shape)}; the policy takes camera images as uint8 pixels 0-255, "
                            f"(B, T, H, W, {self.channels}) channel-last (an image in [0, 1]: (x * 255).round().to(torch.uint8); "
                            "channel-first: x.movedim(-3, -1))")
        b, t = rgb.shape[:2]
        img = rgb.flatten(0, 1).permute(0, 3, 1, 2).float() / 255.0
        feats = self.cnn(self._crop(img)).view(b, t, -1)
        return torch.cat([feats, obs["state"]], dim=-1).flatten(1)
