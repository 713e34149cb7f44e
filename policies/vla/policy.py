"""The small VLA: a Diffusion Policy conditioned on an instruction as well as camera and proprioception.

- Language: a frozen pretrained sentence encoder (all-MiniLM-L6-v2, `text.py`) embeds the instruction;
  a small trained projection joins it to the conditioning vector. The embeddings of the training
  phrasings are kept in the checkpoint, so a known instruction needs no text model at run time.
- Vision: the teacher's RGB encoder (a CNN trained from scratch, with random crops) + proprioception.
- Action: the teacher's denoiser and samplers (ddim/ddpm/rti; `robodistill distill` takes train-teacher checkpoints
  only: it refuses a VLA, whose conditioning needs the instruction).
- Several tasks in one model: each task's state vector is zero-padded to the longest (its layout
  differs per task; the instruction says which task it is), actions share one control mode.

`obs["instruction"]` is a (B, 384) embedding; without it the policy embeds `obs["prompt"]` (text, as
openpi clients send it), else its default `prompt`, which the loader sets from the env's task.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from robodistill.errors import UserError
from robodistill.policies.base import register_loader
from robodistill.policies.diffusion.config import DiffusionConfig
from robodistill.policies.diffusion.policy import DiffusionPolicy
from robodistill.policies.vla.text import DIM, TextEncoder

KIND = "vla"
LANGUAGE_FEATURES = 64


class InstructedEncoder(nn.Module):
    """An observation encoder joined with a learned projection of the instruction embedding."""

    def __init__(self, base: nn.Module, text_dim: int = DIM, features: int = LANGUAGE_FEATURES):
        super().__init__()
        self.base = base
        self.text = nn.Sequential(nn.Linear(text_dim, features), nn.Mish(), nn.Linear(features, features))
        self.out_dim = base.out_dim + features

    def forward(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([self.base(obs), self.text(obs["instruction"])], dim=-1)


class VLAPolicy(DiffusionPolicy):
    def __init__(self, cfg: DiffusionConfig, state_dim: int, action_dim: int, action_low: torch.Tensor,
                 action_high: torch.Tensor, rgb_channels: int, gripper_dims: list[int] | None, tasks: dict[str, int],
                 prompts: dict[str, list[str]]):
        if not rgb_channels:
            raise UserError("the VLA sees images: train it on obs_mode=rgb demonstrations")
        super().__init__(cfg, state_dim, action_dim, action_low, action_high, rgb_channels, gripper_dims)
        self.tasks = dict(tasks)  # task -> its own state size (before padding)
        self.prompts = {task: list(texts) for task, texts in prompts.items()}  # task -> its training phrasings
        self._known = {text: i for i, text in enumerate(t for texts in self.prompts.values() for t in texts)}
        self.register_buffer("prompt_embeddings", torch.zeros(len(self._known), DIM))
        self.prompt: str | None = None  # the default instruction (the loader sets the env task's first phrasing)
        self._text: TextEncoder | None = None

    def build_encoder(self, cfg: DiffusionConfig, state_dim: int, rgb_channels: int | None) -> nn.Module:
        return InstructedEncoder(super().build_encoder(cfg, state_dim, rgb_channels))

    def embed(self, texts: list[str]) -> torch.Tensor:
        """(N, 384) embeddings: the stored ones for training phrasings, the text model for others."""
        if all(t in self._known for t in texts):
            return self.prompt_embeddings[[self._known[t] for t in texts]]
        if self._text is None:
            self._text = TextEncoder()
        return self._text(texts).to(self.prompt_embeddings.device)

    def condition(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        state = obs["state"]
        pad = self.dims["state_dim"] - state.shape[-1]
        if pad < 0:
            raise UserError(f"state has {state.shape[-1]} dims, more than the VLA's {self.dims['state_dim']}: another task or obs_mode?")
        return super().condition({**obs, "state": F.pad(state.float(), (0, pad))})

    @torch.no_grad()
    def predict_chunk(self, obs: dict, streams: torch.Tensor | None = None) -> torch.Tensor:
        obs = dict(obs)
        prompt = obs.pop("prompt", None)
        if "instruction" not in obs:
            batch = obs["state"].shape[0]
            if prompt is None:
                if self.prompt is None:
                    raise UserError("the VLA needs an instruction: send `prompt` with the observation, or load it for an env of one of "
                                    f"its tasks ({', '.join(self.tasks)})")
                prompt = self.prompt
            texts = [prompt] * batch if isinstance(prompt, str) else [str(p) for p in prompt]
            obs["instruction"] = self.embed(texts)
        return super().predict_chunk(obs, streams)

    def spec(self) -> dict:
        return {**super().spec(), "tasks": dict(self.tasks), "prompts": {k: list(v) for k, v in self.prompts.items()}}

    @classmethod
    def from_spec(cls, spec: dict) -> "VLAPolicy":
        dims = spec["dims"]
        a = dims["action_dim"]
        return cls(DiffusionConfig(**spec["config"]), dims["state_dim"], a, -torch.ones(a), torch.ones(a), dims["rgb_channels"],
                   dims.get("gripper_dims"), spec["tasks"], spec["prompts"])


def from_checkpoint(payload: dict) -> VLAPolicy:
    """The EMA VLA of a `train-vla` checkpoint."""
    policy = VLAPolicy.from_spec(payload["policy"])
    try:
        policy.load_state_dict(payload["ema"])
    except RuntimeError as err:
        raise UserError(f"checkpoint weights do not fit the model config saved with them: {str(err)[:500]}") from err
    return policy.eval()


@register_loader(KIND)
def load_vla(payload: dict, env) -> VLAPolicy:
    """The EMA VLA of a `train-vla` checkpoint, told the env task's first instruction."""
    policy = from_checkpoint(payload)
    if env.cfg.task not in policy.tasks:  # first: for one of its tasks, eval takes the fields below from the checkpoint
        raise UserError(f"the VLA was trained on {', '.join(policy.tasks)}, not {env.cfg.task}")
    trained = payload["env"]
    here = {k: getattr(env.cfg, k) for k in ("obs_mode", "control_mode", "image_size")}
    theirs = {k: trained.get(k) for k in here}
    if here != theirs:
        raise UserError(f"the VLA was trained with {theirs}, but the env has {here}: set env.obs_mode/control_mode/image_size to match")
    policy.prompt = policy.prompts[env.cfg.task][0]
    return policy.to(env.device)
