"""Receding-horizon execution of action chunks in a batch of envs that reset independently."""

from __future__ import annotations

import torch

from robodistill.policies.base import Obs, Policy


class ChunkExecutor:
    """Keeps, per env, the last `obs_horizon` observations and the actions left of its chunk.

    An env asks the policy for a new chunk when its actions run out or its episode restarts; only
    those envs' rows are sent to the policy. A new episode's history starts as copies of its first
    observation (as in diffusion_policy).
    """

    def __init__(self, policy: Policy, num_envs: int):
        self.policy = policy
        self.num_envs = num_envs
        self.history: Obs = {}
        self.queue: torch.Tensor | None = None  # (B, act_horizon, A)
        self.left = torch.zeros(num_envs, dtype=torch.long)

    def observe(self, obs: Obs, restarted: torch.Tensor | None = None) -> None:
        """Take the newest observation; `restarted` marks envs whose episode just began."""
        h = self.policy.obs_horizon
        reset = getattr(self.policy, "reset", None)
        if not self.history or restarted is None:
            self.history = {k: v.unsqueeze(1).repeat_interleave(h, dim=1).clone() for k, v in obs.items()}
            self.left.zero_()
            if reset is not None:
                reset(None)
            return
        restarted = restarted.to(self.left.device)
        for k, v in obs.items():
            hist = torch.cat([self.history[k][:, 1:], v.unsqueeze(1)], dim=1)
            fresh = v.unsqueeze(1).repeat_interleave(h, dim=1)
            mask = restarted.to(v.device).view(-1, *([1] * (hist.dim() - 1)))
            self.history[k] = torch.where(mask, fresh, hist)
        self.left[restarted] = 0
        if reset is not None and restarted.any():
            reset(restarted.nonzero().squeeze(1))

    @torch.no_grad()
    def act(self) -> torch.Tensor:
        """The next action of every env, (B, A)."""
        need = self.left == 0
        if need.any():
            rows = need.nonzero().squeeze(1)
            chunk = self.policy.predict_chunk({k: v[rows.to(v.device)] for k, v in self.history.items()}, rows)
            chunk = chunk[:, : self.policy.act_horizon]
            if self.queue is None:
                self.queue = torch.zeros(self.num_envs, *chunk.shape[1:], dtype=chunk.dtype, device=chunk.device)
            self.queue[rows.to(chunk.device)] = chunk
            self.left[rows] = chunk.shape[1]
        step = self.queue.shape[1] - self.left
        action = self.queue[torch.arange(self.num_envs, device=self.queue.device), step.to(self.queue.device)]
        self.left -= 1
        return action
