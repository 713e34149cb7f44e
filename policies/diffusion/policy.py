"""Diffusion Policy: observation history -> action chunk, by denoising with a chosen sampler.

The normalizers live inside the module (fitted on the training split, saved in its state dict), so
`predict_chunk` takes observations and returns actions in env units, clipped to the action bounds.
"""

from __future__ import annotations

from dataclasses import asdict

import torch
from torch import nn
from torch.nn import functional as F

from robodistill.data.normalizers import MODES as NORMALIZER_MODES
from robodistill.data.normalizers import Normalizer
from robodistill.errors import UserError
from robodistill.inference.samplers import (
    SAMPLERS, ConsistencySampler, RTIConfig, RTISampler, Sampler, clip_clean, make_sampler, make_training_scheduler,
)
from robodistill.policies.base import check_trained_on, register_loader
from robodistill.policies.diffusion.config import DiffusionConfig
from robodistill.policies.diffusion.consistency import ConsistencyHead
from robodistill.policies.diffusion.denoisers import ConditionalUnet1D, MlpDenoiser
from robodistill.policies.diffusion.encoders import RgbEncoder, StateEncoder

KIND = "diffusion"


# What the training schedule takes (diffusers' DDPMScheduler; the loss knows these two prediction types) and the default samplers.
CHOICES = {"denoiser": ("mlp", "unet"), "beta_schedule": ("squaredcos_cap_v2", "linear", "scaled_linear", "sigmoid", "laplace"),
           "prediction_type": ("sample", "epsilon"), "sampler": ("ddim", "ddpm"), "normalizer": NORMALIZER_MODES}


def check_config(cfg: DiffusionConfig) -> None:
    """The `policy` block, before any weights are built: a value out of range was torch's or diffusers' traceback, or
    one at the first evaluation after training (sampler_steps=0), or trained on quietly (prediction_type=foo: the
    loss's `sample`, sampled as something else)."""
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise UserError(f"policy.{key}={getattr(cfg, key)} is not one of {', '.join(allowed)}")
    if cfg.num_train_timesteps < 1:
        raise UserError(f"policy.num_train_timesteps={cfg.num_train_timesteps} must be >= 1 (the DDPM training schedule's steps)")
    if not 1 <= cfg.sampler_steps <= cfg.num_train_timesteps:
        raise UserError(f"policy.sampler_steps={cfg.sampler_steps} must be between 1 and policy.num_train_timesteps="
                        f"{cfg.num_train_timesteps} (denoiser calls per action chunk)")
    if cfg.denoiser == "unet" and cfg.pred_horizon % 4:
        raise UserError(f"policy.pred_horizon={cfg.pred_horizon} must be a multiple of 4 for the U-Net denoiser")
    if cfg.denoiser == "unet" and (cfg.kernel_size < 1 or cfg.kernel_size % 2 == 0):
        raise UserError(f"policy.kernel_size={cfg.kernel_size} must be odd and >= 1 (an even one shifts the U-Net's sequence)")
    if cfg.rgb_features < 1:
        raise UserError(f"policy.rgb_features={cfg.rgb_features} must be >= 1 (image features per frame)")
    if not 0 < cfg.crop <= 1:
        raise UserError(f"policy.crop={cfg.crop} must be in (0, 1] (the random crop's share of the image; 1: no crop)")
    if cfg.gripper_scale <= 0:
        raise UserError(f"policy.gripper_scale={cfg.gripper_scale} must be > 0 (1: off)")


class DiffusionPolicy(nn.Module):
    def __init__(
        self,
        cfg: DiffusionConfig,
        state_dim: int,
        action_dim: int,
        action_low: torch.Tensor,
        action_high: torch.Tensor,
        rgb_channels: int | None = None,
        gripper_dims: list[int] | None = None,
    ):
        super().__init__()
        check_config(cfg)
        self.cfg = cfg
        self.obs_horizon = cfg.obs_horizon
        # Binary gripper dims (-1 closed, 1 open): RTI snaps them and may train them scaled.
        self.dims = {"state_dim": state_dim, "action_dim": action_dim, "rgb_channels": rgb_channels,
                     "gripper_dims": list(gripper_dims or [])}
        self.normalizers = nn.ModuleDict({
            "state": Normalizer(state_dim, cfg.normalizer), "actions": Normalizer(action_dim, cfg.normalizer),
        })
        self.register_buffer("action_low", torch.as_tensor(action_low, dtype=torch.float32).clone())
        self.register_buffer("action_high", torch.as_tensor(action_high, dtype=torch.float32).clone())
        self.encoder = self.build_encoder(cfg, state_dim, rgb_channels)
        if cfg.denoiser == "unet":
            self.denoiser: nn.Module = ConditionalUnet1D(action_dim, self.encoder.out_dim, tuple(cfg.unet_dims), cfg.kernel_size)
        else:
            self.denoiser = MlpDenoiser(action_dim, cfg.pred_horizon, self.encoder.out_dim, tuple(cfg.mlp_hidden))
        # min-max maps the demos into [-1, 1], where clipping an estimate keeps it among them; mean/std data reach past it
        self.noise_scheduler = make_training_scheduler(cfg.num_train_timesteps, cfg.beta_schedule, cfg.prediction_type,
                                                       clip_sample=cfg.normalizer == "minmax")
        self.sampler: Sampler = make_sampler(cfg.sampler, cfg.sampler_steps, self.noise_scheduler)
        self.generator: torch.Generator | None = None
        self.consistency: ConsistencyHead | None = None  # attached by `robodistill distill`

    def build_encoder(self, cfg: DiffusionConfig, state_dim: int, rgb_channels: int | None) -> nn.Module:
        """Observation histories -> the conditioning vector (its size: `out_dim`)."""
        if rgb_channels:
            return RgbEncoder(rgb_channels, state_dim, cfg.obs_horizon, cfg.rgb_features, cfg.crop)
        return StateEncoder(state_dim, cfg.obs_horizon)

    @property
    def act_horizon(self) -> int:
        """Actions executed per chunk: the config's, unless the sampler says otherwise (RTI's setting)."""
        return self.sampler.executes or self.cfg.act_horizon

    def set_sampler(self, name: str, steps: int | None = None, rti: RTIConfig | None = None) -> None:
        """`ddpm`/`ddim` with `steps` denoiser calls (default: the checkpoint's `sampler_steps`), `rti` (its tail
        is `rti.timesteps`), or `consistency` with 1-3 calls of the distilled head (default 1)."""
        if name not in SAMPLERS:
            raise UserError(f"sampler '{name}' is not one of {', '.join(SAMPLERS)}")
        n = self.cfg.num_train_timesteps
        if name == "rti":
            if steps is not None:
                raise UserError("sampler=rti takes its denoiser calls from rti.timesteps (e.g. rti.timesteps=[3,1,0]), not steps=")
            # a chunk holds the observed steps and the executed ones (as for act_horizon): more would execute fewer actions
            # than the warm start shifts by, and bench-latency would divide a call's time by actions never executed
            room = self.cfg.pred_horizon - self.obs_horizon + 1
            executes = (rti or RTIConfig()).actions_per_inference
            if executes is not None and executes > room:
                raise UserError(f"rti.actions_per_inference={executes} is more than the {room} actions a chunk holds from the newest "
                                f"observation on (pred_horizon {self.cfg.pred_horizon} - obs_horizon {self.obs_horizon} + 1)")
            try:
                self.sampler = RTISampler(rti or RTIConfig(), self.noise_scheduler, self._snap_gripper, self.cfg.act_horizon)
            except ValueError as err:
                raise UserError(str(err)) from err
            return
        if steps is None:  # not those of the sampler set before: the head's one call, or the checkpoint's own (as export)
            steps = 1 if name == "consistency" else self.cfg.sampler_steps
        if name == "consistency":
            if self.consistency is None:
                raise UserError("this checkpoint has no consistency head: make one with `robodistill distill teacher=<checkpoint>`")
            if not 1 <= steps <= 3:
                raise UserError(f"sampler=consistency takes steps=1, 2 or 3, got {steps}")
            self.sampler = ConsistencySampler(self.consistency, steps, self.noise_scheduler)
            return
        if not 1 <= steps <= n:
            raise UserError(f"steps={steps} must be between 1 and the {n} training timesteps")
        self.sampler = make_sampler(name, steps, self.noise_scheduler)

    def reset(self, streams: torch.Tensor | None = None) -> None:
        """Forget what a stateful sampler remembers of these streams (envs whose episode restarted)."""
        self.sampler.reset(streams)

    def _snap_gripper(self, x: torch.Tensor) -> torch.Tensor:
        """Binary gripper dims of a normalised chunk set to exactly closed (-1) or open (1)."""
        grip = self.dims["gripper_dims"]
        if not grip:
            return x
        norm = self.normalizers["actions"]
        raw = norm.unnormalize(x)[..., grip]
        x = x.clone()
        x[..., grip] = (torch.where(raw >= 0, 1.0, -1.0) - norm.center[grip]) * norm.scale[grip]
        return x

    def load_normalizers(self, fitted: dict[str, Normalizer]) -> None:
        """Take the `state` and `actions` normalizers fitted on the training split
        (`robodistill.data.fit_normalizers`)."""
        for key in ("state", "actions"):
            self.normalizers[key].load_state_dict(fitted[key].state_dict())
        if self.cfg.gripper_scale != 1:
            grip = self.dims["gripper_dims"]
            self.normalizers["actions"].center[grip] = 0.0
            self.normalizers["actions"].scale[grip] = 1 / self.cfg.gripper_scale

    def condition(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Raw observation histories -> the denoiser's conditioning vector."""
        obs = {**obs, "state": self.normalizers["state"](obs["state"].float())}
        return self.encoder(obs)

    def loss(self, batch: dict) -> torch.Tensor:
        """The denoising loss on a batch of raw windows (`obs` (B, T, ...), `actions` (B, H, A))."""
        cond = self.condition(batch["obs"])
        x0 = self.normalizers["actions"](batch["actions"])
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.cfg.num_train_timesteps, (x0.shape[0],), device=x0.device)
        x_t = self.noise_scheduler.add_noise(x0, noise, t)
        target = noise if self.cfg.prediction_type == "epsilon" else x0
        return F.mse_loss(self.denoiser(x_t, t, cond), target)

    def forward(self, batch: dict) -> torch.Tensor:
        """The training loss (so DistributedDataParallel, which hooks forward, can wrap the policy)."""
        return self.loss(batch)

    @torch.no_grad()
    def predict_chunk(self, obs: dict[str, torch.Tensor], streams: torch.Tensor | None = None) -> torch.Tensor:
        """(B, act_horizon, A) actions in env units: the part of the predicted chunk that starts at
        the newest observation. `streams`: the env of each row, for stateful samplers (RTI)."""
        cond = self.condition({k: v.to(self.action_low.device) for k, v in obs.items()})
        shape = (cond.shape[0], self.cfg.pred_horizon, self.dims["action_dim"])
        return self.to_actions(self.sampler(self.denoiser, cond, shape, self.generator, streams))

    def to_actions(self, x0: torch.Tensor) -> torch.Tensor:
        """A sampled chunk in model space -> its executed part (from the newest observation on) in
        env units, within the action bounds."""
        start = self.obs_horizon - 1
        x0 = x0[:, start : start + self.act_horizon]
        actions = self.normalizers["actions"].unnormalize(clip_clean(x0, self.noise_scheduler))
        return torch.clamp(actions, self.action_low, self.action_high)

    def spec(self) -> dict:
        """What rebuilds this module: saved in checkpoints next to the weights."""
        return {"config": asdict(self.cfg), "dims": dict(self.dims)}

    @classmethod
    def from_spec(cls, spec: dict) -> "DiffusionPolicy":
        dims = spec["dims"]
        a = dims["action_dim"]
        return cls(DiffusionConfig(**spec["config"]), dims["state_dim"], a, -torch.ones(a), torch.ones(a),
                   dims["rgb_channels"], dims.get("gripper_dims"))


def from_checkpoint(payload: dict) -> DiffusionPolicy:
    """The EMA policy of a teacher checkpoint, with its consistency head if it has one."""
    policy = DiffusionPolicy.from_spec(payload["policy"])
    try:
        policy.load_state_dict(payload["ema"])
        if "consistency" in payload:
            head = ConsistencyHead.from_denoiser(policy.denoiser)
            head.load_state_dict(payload["consistency"]["weights"])
            policy.consistency = head
    except RuntimeError as err:
        raise UserError(f"checkpoint weights do not fit the model config saved with them: {str(err)[:500]}") from err
    return policy.eval()


@register_loader(KIND)
def load_diffusion(payload: dict, env) -> DiffusionPolicy:
    """Rebuild the EMA policy of a teacher checkpoint and check it fits `env`."""
    check_trained_on("the checkpoint", payload["env"], env)
    return from_checkpoint(payload).to(env.device)
