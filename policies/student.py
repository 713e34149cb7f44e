"""The RL student: a stable-baselines3 actor-critic saved as an SB3 zip (`robodistill rpd`).

`stable_baselines3.PPO.load(path)` opens the file and `predict`s with it. `GaussianStudent` wraps it
so that the shared evaluation, export and serving see the Policy contract: the mean action
(deterministic), one action per observation (obs_horizon = act_horizon = 1). Its observation
normalisation lives inside the network (`NormalizedState`; `StateAndImage` adds SB3's NatureCNN for
obs_mode=rgb, shared by actor and critic as in RPD), so the zip is the whole policy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor, NatureCNN

from robodistill.errors import UserError
from robodistill.policies.base import Obs, check_trained_on


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


class StateAndImage(BaseFeaturesExtractor):
    """obs_mode=rgb: NatureCNN features of the camera image (SB3 hands it channel-first, scaled to
    [0, 1]) joined with the normalised state."""

    def __init__(self, observation_space: spaces.Dict, cnn_features: int = 256):
        state = NormalizedState(observation_space["state"])
        super().__init__(observation_space, features_dim=cnn_features + state.features_dim)
        self.state = state
        self.cnn = NatureCNN(observation_space["rgb"], features_dim=cnn_features)

    def fit(self, states: np.ndarray) -> None:
        self.state.fit(states)

    def forward(self, observations: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([self.cnn(observations["rgb"]), self.state(observations["state"])], dim=1)


class GaussianStudent:
    obs_horizon = 1
    act_horizon = 1

    def __init__(self, model):
        self.model = model

    @torch.no_grad()
    def predict_chunk(self, obs: Obs, streams: torch.Tensor | None = None) -> torch.Tensor:
        state = obs["state"][:, -1]
        if isinstance(self.model.observation_space, spaces.Dict):  # SB3 transposes the channel-last images itself
            actions, _ = self.model.predict({k: obs[k][:, -1].cpu().numpy() for k in self.model.observation_space.spaces},
                                            deterministic=True)
        else:
            actions, _ = self.model.predict(state.cpu().numpy(), deterministic=True)
        return torch.as_tensor(actions, dtype=torch.float32, device=state.device)[:, None]


def open_student(path: str):
    """The SB3 PPO model in a zip, or a one-line error naming the file."""
    from stable_baselines3 import PPO

    try:
        return PPO.load(path, device="cpu")
    except Exception as err:  # SB3 raises several types for foreign or truncated zips
        raise UserError(f"'{path}' is not a stable-baselines3 PPO zip ({type(err).__name__}: {err})") from err


def load_student(path: str, env) -> GaussianStudent:
    """An SB3 zip for `env`: the task and modes it records (students of `robodistill rpd` do) and its
    observation and action sizes must match."""
    model = open_student(path)
    if getattr(model, "robodistill_env", None) is not None:  # PushCube and PullCube share their sizes: the task tells
        check_trained_on(f"'{path}'", model.robodistill_env, env)
    space = env.single_observation_space
    if isinstance(model.observation_space, spaces.Dict):
        rgb = space.spaces.get("rgb")
        c, h, w = model.observation_space["rgb"].shape  # stored channel-first
        have = {"state": model.observation_space["state"].shape, "rgb": (h, w, c)}
        want = {"state": space["state"].shape, "rgb": rgb.shape if rgb is not None else None}
    else:
        have, want = model.observation_space.shape, space["state"].shape if set(space.spaces) == {"state"} else None
    if have != want or model.action_space.shape != env.single_action_space.shape:
        raise UserError(f"'{Path(path).name}' takes observations {have} and actions {model.action_space.shape}; this env "
                        f"gives {want or dict((k, v.shape) for k, v in space.spaces.items())} and {env.single_action_space.shape}: "
                        "set env=... (task, obs_mode, image_size) to match")
    return GaussianStudent(model)
