"""Diffusion Policy: observation history -> action chunk, by denoising with a chosen sampler.

The normalizers live inside the module (fitted on the training split, saved in its state dict), so
`predict_chunk` takes observations and returns actions in env units, clipped to the action bounds.
"""

from __future__ import annotations

from dataclasses import asdict

import torch
from torch import nn
from torch.nn import functional as F

from robodistill.data.normalizers import Normalizer
from robodistill.errors import UserError
from robodistill.inference.samplers import SAMPLERS, Sampler, make_sampler, make_training_scheduler
from robodistill.policies.base import register_loader
from robodistill.policies.diffusion.config import DiffusionConfig
from robodistill.policies.diffusion.denoisers import ConditionalUnet1D, MlpDenoiser
from robodistill.policies.diffusion.encoders import RgbEncoder, StateEncoder

KIND = "diffusion"


class DiffusionPolicy(nn.Module):
    def __init__(
        self,
        cfg: DiffusionConfig,
        state_dim: int,
        action_dim: int,
        action_low: torch.Tensor,
        action_high: torch.Tensor,
        rgb_channels: int | None = None,
    ):
        super().__init__()
        if cfg.denoiser == "unet" and cfg.pred_horizon % 4:
            raise UserError(f"policy.pred_horizon={cfg.pred_horizon} must be a multiple of 4 for the U-Net denoiser")
        if cfg.denoiser not in ("unet", "mlp"):
            raise UserError(f"policy.denoiser='{cfg.denoiser}' is not one of unet, mlp")
        self.cfg = cfg
        self.obs_horizon, self.act_horizon = cfg.obs_horizon, cfg.act_horizon
        self.dims = {"state_dim": state_dim, "action_dim": action_dim, "rgb_channels": rgb_channels}
        self.normalizers = nn.ModuleDict({
            "state": Normalizer(state_dim, cfg.normalizer), "actions": Normalizer(action_dim, cfg.normalizer),
        })
        self.register_buffer("action_low", torch.as_tensor(action_low, dtype=torch.float32).clone())
        self.register_buffer("action_high", torch.as_tensor(action_high, dtype=torch.float32).clone())
        if rgb_channels:
            self.encoder: nn.Module = RgbEncoder(rgb_channels, state_dim, cfg.obs_horizon, cfg.rgb_features, cfg.crop)
        else:
            self.encoder = StateEncoder(state_dim, cfg.obs_horizon)
        if cfg.denoiser == "unet":
            self.denoiser: nn.Module = ConditionalUnet1D(action_dim, self.encoder.out_dim, tuple(cfg.unet_dims), cfg.kernel_size)
        else:
            self.denoiser = MlpDenoiser(action_dim, cfg.pred_horizon, self.encoder.out_dim, tuple(cfg.mlp_hidden))
        self.noise_scheduler = make_training_scheduler(cfg.num_train_timesteps, cfg.beta_schedule, cfg.prediction_type)
        self.sampler: Sampler = make_sampler(cfg.sampler, cfg.sampler_steps, self.noise_scheduler)
        self.generator: torch.Generator | None = None

    def set_sampler(self, name: str, steps: int) -> None:
        if name not in SAMPLERS:
            raise UserError(f"sampler '{name}' is not one of {', '.join(SAMPLERS)}")
        if not 1 <= steps <= self.cfg.num_train_timesteps:
            raise UserError(f"steps={steps} must be between 1 and the {self.cfg.num_train_timesteps} training timesteps")
        self.sampler = make_sampler(name, steps, self.noise_scheduler)

    def load_normalizers(self, fitted: dict[str, Normalizer]) -> None:
        """Take the `state` and `actions` normalizers fitted on the training split
        (`robodistill.data.fit_normalizers`)."""
        for key in ("state", "actions"):
            self.normalizers[key].load_state_dict(fitted[key].state_dict())

    def _condition(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        obs = {**obs, "state": self.normalizers["state"](obs["state"].float())}
        return self.encoder(obs)

    def loss(self, batch: dict) -> torch.Tensor:
        """The denoising loss on a batch of raw windows (`obs` (B, T, ...), `actions` (B, H, A))."""
        cond = self._condition(batch["obs"])
        x0 = self.normalizers["actions"](batch["actions"])
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.cfg.num_train_timesteps, (x0.shape[0],), device=x0.device)
        x_t = self.noise_scheduler.add_noise(x0, noise, t)
        target = noise if self.cfg.prediction_type == "epsilon" else x0
        return F.mse_loss(self.denoiser(x_t, t, cond), target)

    @torch.no_grad()
    def predict_chunk(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, act_horizon, A) actions in env units: the part of the predicted chunk that starts at
        the newest observation."""
        cond = self._condition({k: v.to(self.action_low.device) for k, v in obs.items()})
        shape = (cond.shape[0], self.cfg.pred_horizon, self.dims["action_dim"])
        x0 = self.sampler(self.denoiser, cond, shape, self.generator)
        actions = self.normalizers["actions"].unnormalize(x0.clamp(-1, 1) if self.cfg.normalizer == "minmax" else x0)
        start = self.obs_horizon - 1
        actions = actions[:, start : start + self.act_horizon]
        return torch.maximum(torch.minimum(actions, self.action_high), self.action_low)

    def spec(self) -> dict:
        """What rebuilds this module: saved in checkpoints next to the weights."""
        return {"config": asdict(self.cfg), "dims": dict(self.dims)}

    @classmethod
    def from_spec(cls, spec: dict) -> "DiffusionPolicy":
        dims = spec["dims"]
        a = dims["action_dim"]
        return cls(DiffusionConfig(**spec["config"]), dims["state_dim"], a, -torch.ones(a), torch.ones(a), dims["rgb_channels"])


@register_loader(KIND)
def load_diffusion(payload: dict, env) -> DiffusionPolicy:
    """Rebuild the EMA policy of a teacher checkpoint and check it fits `env`."""
    trained_on = payload["env"]
    here = {k: getattr(env.cfg, k) for k in ("task", "obs_mode", "control_mode")}
    theirs = {k: trained_on.get(k) for k in here}
    if here != theirs:
        raise UserError(f"the checkpoint was trained on {theirs}, but the env is {here}: set env=... to match")
    policy = DiffusionPolicy.from_spec(payload["policy"])
    try:
        policy.load_state_dict(payload["ema"])
    except RuntimeError as err:
        raise UserError(f"checkpoint weights do not fit the model config saved with them: {str(err)[:500]}") from err
    return policy.eval().to(env.device)
