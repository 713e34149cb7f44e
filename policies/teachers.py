"""Teachers: what RPD (and later RL-100) asks for an action, whatever the teacher is.

A teacher maps a batch of observation histories to the actions it would execute from there before
asking again: `act(obs) -> (B, act_horizon, A)` in env units, where `obs[key]` is
(B, obs_horizon, ...) as in the Policy contract. It is queried on stored observations and never
executed, so it only has to be right, not fast per call. Three kinds:

- any `Policy` (a diffusion checkpoint with its fastest sampler: the consistency head if it has one,
  else its own; a bundle directory): the first `act_horizon` actions of the chunk it predicts;
- a policy served over openpi's websocket protocol (`ws://host:port`: `robodistill serve`, or a VLA
  served by openpi), one request per observation through `openpi_client.WebsocketClientPolicy`,
  with the task's instruction as `prompt` in the observation dict, as openpi clients send it; its
  chunk is as long as the server's metadata says (`action.chunk_length`), else one action;
- the small VLA (a `train-vla` checkpoint, told the env task's instruction), or a VLA kept on local
  disk in Hugging Face format (an OpenVLA-style directory: `robodistill.policies.vla.hf`).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch

from robodistill.errors import UserError
from robodistill.policies.base import Obs, Policy, load_policy
from robodistill.wire import chunk_in, connect


@runtime_checkable
class Teacher(Protocol):
    obs_horizon: int
    act_horizon: int

    def act(self, obs: Obs) -> torch.Tensor: ...


class PolicyTeacher:
    """A `Policy` as a teacher: the executed part of each predicted chunk."""

    def __init__(self, policy: Policy):
        self.policy = policy
        self.obs_horizon = policy.obs_horizon

    @property
    def act_horizon(self) -> int:
        return self.policy.act_horizon

    @torch.no_grad()
    def act(self, obs: Obs) -> torch.Tensor:
        return self.policy.predict_chunk(obs)[:, : self.act_horizon]


class RemoteTeacher:
    """A policy behind openpi's websocket protocol. Its metadata must say `policy.obs_horizon`
    (robodistill bundles do); a server without it (e.g. openpi's) gets single frames."""

    def __init__(self, url: str, action_dims: int, api_key: str | None = None, prompt: str | None = None,
                 timeout_ms: float | None = None):
        self.client = connect(url, api_key, timeout_ms)
        self.url, self.action_dims, self.prompt = url, action_dims, prompt
        meta = self.client.get_server_metadata()
        try:
            horizon = self._count(meta, "policy", "obs_horizon")
            self.act_horizon = self._count(meta, "action", "chunk_length") or 1
        except UserError:
            self.client.close()
            raise
        self.single_frame = horizon is None
        self.obs_horizon = horizon or 1

    def _count(self, meta: dict, block: str, field: str) -> int | None:
        """`meta[block][field]`, a count >= 1; None where the metadata has no such block, which another server's
        metadata (openpi's: whatever its config holds) may use for anything."""
        fields = meta.get(block)
        if not isinstance(fields, dict) or field not in fields:
            return None
        value = fields[field]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise UserError(f"teacher={self.url}: the server's metadata says {block}.{field}={value!r}, not a count >= 1: "
                            "serve a robodistill bundle (`robodistill serve bundle=<dir>`), or fix the server's metadata")
        return int(value)

    def act(self, obs: Obs) -> torch.Tensor:
        arrays = {k: v.cpu().numpy() for k, v in obs.items()}
        batch = next(iter(arrays.values())).shape[0]
        out = []
        for i in range(batch):
            row = {k: (v[i, -1] if self.single_frame else v[i]) for k, v in arrays.items()}
            if self.prompt is not None:
                row["prompt"] = self.prompt
            reply = self.client.infer(row)
            try:  # a reply of NaN was trained on until the student's own actions were NaN; another shape, a traceback
                chunk = chunk_in(reply, self.action_dims, "this env's")
            except UserError as err:
                raise UserError(f"teacher={self.url}: {err}") from err
            out.append(chunk[: self.act_horizon])
        return torch.from_numpy(np.stack(out)).to(next(iter(obs.values())).device)


def load_teacher(spec: str, env, api_key: str | None = None, timeout_ms: float | None = None) -> Teacher | None:
    """`none`, `ws://host:port` (a served policy, whose request unanswered for `timeout_ms` ends the run) or a
    checkpoint / bundle path for `env`."""
    if spec in ("", "none", None):
        return None
    if spec.startswith(("ws://", "wss://")):
        from robodistill.policies.vla.instructions import INSTRUCTIONS

        return RemoteTeacher(spec, len(env.action_low), api_key, INSTRUCTIONS.get(env.cfg.task, [None])[0], timeout_ms)
    try:
        policy = load_policy(spec, env)
    except UserError as err:
        raise UserError(f"teacher={spec}: {err}") from err
    if getattr(policy, "consistency", None) is not None:
        policy.set_sampler("consistency", 1)  # the cheapest way to ask a diffusion teacher
    if not isinstance(policy, Policy):
        raise UserError(f"teacher={spec} is not a policy")
    return PolicyTeacher(policy)
