"""The RL student: a stable-baselines3 actor-critic saved as an SB3 zip (`robodistill rpd`).

`stable_baselines3.PPO.load(path)` opens the file and `predict`s with it. `GaussianStudent` wraps it
so that the shared evaluation, export and serving see the Policy contract: the mean action
(deterministic), one action per observation (obs_horizon = act_horizon = 1). Its observation
normalisation lives inside the network (`NormalizedState`), so the zip is the whole policy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor

from robodistill.errors import UserError
from robodistill.policies.base import Obs


class NormalizedState(BaseFeaturesExtractor):
    """(state - mean) / std, clipped to +-clip, with statistics fitted once before training (`fit`)
    and saved as buffers. ManiSkill states mix joint angles of order 1 with object positions that
    differ by centimetres between episodes; unscaled, an MLP barely sees what tells states apart."""

    def __init__(self, observation_space: spaces.Box, clip: float = 5.0):
        super().__init__(observation_space, features_dim=int(np.prod(observation_space.shape)))
        self.clip = clip
        self.register_buffer("mean", torch.zeros(self.features_dim))
        self.register_buffer("std", torch.ones(self.features_dim))

    def fit(self, states: np.ndarray, min_std: float = 1e-2) -> None:
        x = torch.as_tensor(states, dtype=torch.float32).reshape(-1, self.features_dim)
        self.mean.copy_(x.mean(0))
        self.std.copy_(x.std(0).clamp_min(min_std))  # near-constant features are centred, not blown up

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return ((observations.flatten(1) - self.mean) / self.std).clamp(-self.clip, self.clip)


class GaussianStudent:
    obs_horizon = 1
    act_horizon = 1

    def __init__(self, model):
        self.model = model

    @torch.no_grad()
    def predict_chunk(self, obs: Obs, streams: torch.Tensor | None = None) -> torch.Tensor:
        state = obs["state"][:, -1]
        actions, _ = self.model.predict(state.cpu().numpy(), deterministic=True)
        return torch.as_tensor(actions, dtype=torch.float32, device=state.device)[:, None]


def load_student(path: str, env) -> GaussianStudent:
    """An SB3 zip for `env`: its observation and action sizes must match."""
    from stable_baselines3 import PPO

    try:
        model = PPO.load(path, device="cpu")
    except Exception as err:  # SB3 raises several types for foreign or truncated zips
        raise UserError(f"'{path}' is not a stable-baselines3 PPO zip ({type(err).__name__}: {err})") from err
    want_obs = env.single_observation_space["state"].shape
    if model.observation_space.shape != want_obs or model.action_space.shape != env.single_action_space.shape:
        raise UserError(f"'{Path(path).name}' takes observations {model.observation_space.shape} and actions "
                        f"{model.action_space.shape}; this env has {want_obs} and {env.single_action_space.shape}: set env=... to match")
    return GaussianStudent(model)
