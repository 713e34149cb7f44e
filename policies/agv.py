"""The AGV Gaussian MLP actor, and the deterministic policy `robodistill eval` rebuilds from its checkpoint."""

from __future__ import annotations

import torch
from torch import nn

from robodistill.errors import UserError
from robodistill.policies.base import Obs, register_loader

KIND = "agv_ppo"
OBS_CLIP = 5.0


def layer(n_in: int, n_out: int, std: float = 2**0.5) -> nn.Linear:
    """Orthogonal weights, zero bias: the PPO implementation detail that keeps early updates tame."""
    lin = nn.Linear(n_in, n_out)
    nn.init.orthogonal_(lin.weight, std)
    nn.init.zeros_(lin.bias)
    return lin


def normalize(obs: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    return ((obs - mean) / torch.sqrt(var + 1e-8)).clamp(-OBS_CLIP, OBS_CLIP)


class GaussianActor(nn.Module):
    """Mean from a tanh MLP of the normalized observation; a learned state-independent log std."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int):
        super().__init__()
        self.mean = nn.Sequential(layer(obs_dim, hidden), nn.Tanh(), layer(hidden, hidden), nn.Tanh(), layer(hidden, act_dim, 0.01))
        self.log_std = nn.Parameter(torch.zeros(act_dim))

    def dist(self, obs: torch.Tensor) -> torch.distributions.Normal:
        mean = self.mean(obs)
        return torch.distributions.Normal(mean, self.log_std.exp().expand_as(mean))


class AGVPolicy:
    """The actor's mean action, clipped to the action box: evaluation without exploration noise."""

    obs_horizon = 1
    act_horizon = 1

    def __init__(self, actor: GaussianActor, obs_mean: torch.Tensor, obs_var: torch.Tensor):
        self.actor, self.obs_mean, self.obs_var = actor, obs_mean, obs_var

    @torch.no_grad()
    def predict_chunk(self, obs: Obs, streams: torch.Tensor | None = None) -> torch.Tensor:
        x = normalize(obs["state"][:, -1].float(), self.obs_mean, self.obs_var)
        return self.actor.mean(x).clamp(-1.0, 1.0).unsqueeze(1)


def payload(actor: GaussianActor, obs_mean: torch.Tensor, obs_var: torch.Tensor, hidden: int, config: dict, env: dict,
            step: int) -> dict:
    obs_dim = obs_mean.shape[0]
    return {
        "kind": KIND, "config": config, "env": env, "step": step, "hidden": hidden, "obs_dim": obs_dim,
        "act_dim": actor.log_std.shape[0], "actor": actor.state_dict(), "obs_mean": obs_mean.clone(), "obs_var": obs_var.clone(),
    }


@register_loader(KIND)
def from_checkpoint(ckpt: dict, env) -> AGVPolicy:
    obs_dim = env.single_observation_space["state"].shape[0]
    if ckpt["obs_dim"] != obs_dim:
        raise UserError(f"this AGV policy takes {ckpt['obs_dim']}-d observations but the env gives {obs_dim}; evaluate it with env=agv")
    actor = GaussianActor(ckpt["obs_dim"], ckpt["act_dim"], ckpt["hidden"])
    actor.load_state_dict(ckpt["actor"])
    actor.eval()
    return AGVPolicy(actor, ckpt["obs_mean"], ckpt["obs_var"])
