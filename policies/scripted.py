"""A scripted PushCube-v1 expert that reads only the state observation.

It exists so that a fresh install can show a policy that succeeds, and so that tests can check that
success is detected and that evaluation is deterministic: it is not a learned policy.
"""

from __future__ import annotations

import torch

# Offsets into PushCube-v1's flat state (pd_ee_* control): qpos 9, qvel 9, tcp_pose 7, goal_pos 3, obj_pose 7.
TCP, GOAL, OBJ = slice(18, 21), slice(25, 28), slice(28, 31)
MAX_STEP = 0.1  # metres per action unit of pd_ee_delta_pos


class PushCubeScripted:
    """Go behind the cube (seen from the goal), lower the closed gripper, push it onto the goal."""

    obs_horizon = 1
    act_horizon = 1
    supported = {"task": "PushCube-v1", "control_mode": "pd_ee_delta_pos", "obs_mode": "state"}

    def predict_chunk(self, obs: dict[str, torch.Tensor], streams: torch.Tensor | None = None) -> torch.Tensor:
        state = obs["state"][:, -1]
        tcp, goal, obj = state[:, TCP], state[:, GOAL], state[:, OBJ]
        direction = goal[:, :2] - obj[:, :2]
        direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-6)
        rel = tcp[:, :2] - obj[:, :2]
        along = (rel * direction).sum(1)
        across = (rel[:, 0] * direction[:, 1] - rel[:, 1] * direction[:, 0]).abs()
        pre = obj[:, :2] - 0.06 * direction
        behind = (along < -0.015) & (across < 0.02)
        low = tcp[:, 2] < 0.04
        near_pre = (tcp[:, :2] - pre).norm(dim=1) < 0.01

        target = torch.cat([pre, torch.full_like(pre[:, :1], 0.08)], dim=1)
        target = torch.where(near_pre[:, None], torch.cat([pre, torch.full_like(pre[:, :1], 0.02)], 1), target)
        push = torch.cat([goal[:, :2] - 0.03 * direction, torch.full_like(pre[:, :1], 0.02)], 1)
        pushing = (behind & low)[:, None]
        target = torch.where(pushing, push, target)

        # Push slowly: a fast push slides the cube past the goal.
        limit = torch.where(pushing, 0.3, 1.0)
        move = torch.maximum(torch.minimum((target - tcp) / MAX_STEP, limit), -limit)
        gripper = -torch.ones_like(move[:, :1])  # closed: the fingers make a flat pusher
        return torch.cat([move, gripper], dim=1)[:, None]
