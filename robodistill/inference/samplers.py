"""Samplers: turn a denoiser into action chunks. They know schedulers, never a policy class.

A denoiser is any callable `(x_t (B, H, A), t (B,) long, cond) -> prediction` of the kind the
scheduler was trained for (epsilon or sample). Every sampler has the same call:
`sampler(denoiser, cond, shape, generator, streams) -> x_0` in model (normalised) space, so new
ones plug in without touching the model:

- `ddpm` / `ddim`: a fresh chunk from noise in `steps` denoiser calls.
- `rti`: Real-Time Iteration (Duan et al. 2025): after one full denoise per episode, every call
  warm-starts from the stream's previous chunk shifted by the actions executed since, and runs only a
  short tail of the DDPM timesteps (e.g. [3, 1, 0]). It keeps one chunk per stream (env), so it has
  `reset(streams)` for episodes that restart.
- `consistency`: a distilled one-step head (`robodistill distill`) in 1-3 calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import nn

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

SAMPLERS = ("ddpm", "ddim", "rti", "consistency")


class Sampler(Protocol):
    name: str
    steps: int  # denoiser calls per chunk (for rti: per warm-started chunk)
    executes: int | None  # actions executed per chunk; None: the policy's act_horizon

    def __call__(self, denoiser: Denoiser, cond: torch.Tensor, shape: tuple, generator: torch.Generator | None = None,
                 streams: torch.Tensor | None = None) -> torch.Tensor: ...

    def reset(self, streams: torch.Tensor | None = None) -> None: ...


def make_training_scheduler(num_train_timesteps: int = 100, beta_schedule: str = "squaredcos_cap_v2", prediction_type: str = "epsilon",
                            clip_sample: bool = True) -> DDPMScheduler:
    """The noise schedule a diffusion policy is trained with (and saved with). `clip_sample`: clean-chunk estimates
    are clipped to [-1, 1], the data's range in a min-max normalised space (a mean/std one reaches past it)."""
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
        clip_sample=clip_sample, prediction_type=prediction_type,
    )


def clip_clean(x0: torch.Tensor, scheduler: DDPMScheduler) -> torch.Tensor:
    """A clean-chunk estimate clipped as the schedule's own steps clip theirs (`clip_sample`), for the code that
    forms one outside them (the chain's mean, the consistency head, distillation targets, the executed actions)."""
    if not scheduler.config.clip_sample:
        return x0
    bound = scheduler.config.clip_sample_range
    return x0.clamp(-bound, bound)


def ddim_step(pred: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, alpha_prev: torch.Tensor, scheduler: DDPMScheduler) -> torch.Tensor:
    """The deterministic DDIM (eta=0) step from x, at cumulative alpha `alpha`, to `alpha_prev`, given the denoiser's
    prediction `pred`: what diffusers' DDIMScheduler.step computes (epsilon from the unclipped clean-chunk estimate,
    the estimate clipped by `clip_clean`), written out for steps it cannot take: a gradient through it (the RL
    chain), a timestep per sample (consistency distillation)."""
    if scheduler.config.prediction_type == "epsilon":
        eps, x0 = pred, (x - (1 - alpha).sqrt() * pred) / alpha.sqrt()
    else:
        eps, x0 = (x - alpha.sqrt() * pred) / (1 - alpha).sqrt(), pred
    return alpha_prev.sqrt() * clip_clean(x0, scheduler) + (1 - alpha_prev).sqrt() * eps


def _device(cond) -> torch.device:
    return cond.device if isinstance(cond, torch.Tensor) else next(iter(cond.values())).device


@dataclass
class SchedulerSampler:
    """DDPM (stochastic) or DDIM (deterministic, eta=0) over `steps` of the training timesteps."""

    name: str
    steps: int
    scheduler: DDPMScheduler | DDIMScheduler
    executes: int | None = None

    @torch.no_grad()
    def __call__(self, denoiser: Denoiser, cond: torch.Tensor, shape: tuple, generator: torch.Generator | None = None,
                 streams: torch.Tensor | None = None) -> torch.Tensor:
        device = _device(cond)
        x = torch.randn(shape, generator=generator, device=device)
        self.scheduler.set_timesteps(self.steps, device=device)
        for t in self.scheduler.timesteps:
            pred = denoiser(x, t.expand(shape[0]).to(device), cond)
            x = self.scheduler.step(pred, t, x, generator=generator).prev_sample
        return x

    def reset(self, streams: torch.Tensor | None = None) -> None:
        """Stateless: every chunk starts from fresh noise."""


@dataclass
class RTIConfig:
    """The `rti` sampler (`sampler=rti rti.timesteps=[3,1,0]`).

    timesteps: the DDPM tail run on the warm start, descending, out of the training timesteps
        (the paper: [2,1,0] PushT, [3,1,0] most state tasks, [5,3,2,1,0] Transport).
    actions_per_inference: actions executed per chunk (at most pred_horizon - obs_horizon + 1); None: the
        policy's act_horizon. The paper executes 1; our teachers, trained to execute 8-action chunks,
        lose much of their success when re-planning after every action, with or without RTI (PushCube:
        57% with [3,1,0], 63% with a near-fresh [99,75,50,25,0], vs 99% for DDPM-100 executing 8).
    gripper: `snap` sets binary gripper dims of the stored guess to exactly closed/open (the
        paper's clip variant, no retraining; the output is then binary too), `none` leaves them.
        The paper's scale variant is a training option: policy.gripper_scale=10 in train-teacher.
    first, first_steps: the full denoise that starts each episode (default DDPM over all training
        timesteps, as in the paper).
    """

    timesteps: list[int] = field(default_factory=lambda: [3, 1, 0])
    actions_per_inference: int | None = None
    gripper: str = "snap"
    first: str = "ddpm"
    first_steps: int | None = None


class RTISampler:
    """Warm-started tail denoising with one remembered chunk per stream (see the module doc)."""

    name = "rti"

    def __init__(self, cfg: RTIConfig, training: DDPMScheduler, snap: Callable[[torch.Tensor], torch.Tensor] | None,
                 act_horizon: int = 1):
        n = training.config.num_train_timesteps
        ts = list(cfg.timesteps)
        if not ts or any(not 0 <= t < n for t in ts) or any(a <= b for a, b in zip(ts, ts[1:])):
            raise ValueError(f"rti.timesteps={ts} must be strictly descending values in [0, {n - 1}], e.g. [3, 1, 0]")
        if cfg.actions_per_inference is not None and cfg.actions_per_inference < 1:
            raise ValueError(f"rti.actions_per_inference={cfg.actions_per_inference} must be >= 1 (or null: the policy's act_horizon)")
        if cfg.gripper not in ("snap", "none"):
            raise ValueError(f"rti.gripper='{cfg.gripper}' is not one of snap, none")
        # checked here, not at an episode's first chunk (a traceback), nor read as another setting (0: all timesteps)
        if cfg.first not in ("ddpm", "ddim"):
            raise ValueError(f"rti.first='{cfg.first}' is not one of ddpm, ddim (the full denoise that starts each episode)")
        if cfg.first_steps is not None and not 1 <= cfg.first_steps <= n:
            raise ValueError(f"rti.first_steps={cfg.first_steps} must be between 1 and the {n} training timesteps (null: all)")
        self.timesteps = ts
        self.steps = len(ts)
        self.executes = cfg.actions_per_inference or act_horizon
        self.first = make_sampler(cfg.first, cfg.first_steps or n, training)
        self.scheduler = DDPMScheduler.from_config(training.config)
        self.snap = snap if cfg.gripper == "snap" else None
        self.memory: torch.Tensor | None = None  # (streams, H, A): the last chunk of each stream
        self.warm = torch.zeros(0, dtype=torch.bool)  # which streams have one

    def reset(self, streams: torch.Tensor | None = None) -> None:
        if streams is None:
            self.warm.zero_()
        else:
            self.warm[streams[streams < len(self.warm)].cpu()] = False

    @torch.no_grad()
    def __call__(self, denoiser: Denoiser, cond: torch.Tensor, shape: tuple, generator: torch.Generator | None = None,
                 streams: torch.Tensor | None = None) -> torch.Tensor:
        device = _device(cond)
        streams = torch.arange(shape[0]) if streams is None else streams.cpu()
        need = int(streams.max()) + 1
        if self.memory is None or len(self.warm) < need:
            memory = torch.zeros(need, *shape[1:], device=device)
            warm = torch.zeros(need, dtype=torch.bool)
            if self.memory is not None:
                memory[: len(self.warm)], warm[: len(self.warm)] = self.memory, self.warm
            self.memory, self.warm = memory, warm
        x = torch.empty(shape, device=device)
        warm = self.warm[streams]
        if (~warm).any():
            cold = (~warm).nonzero().squeeze(1)
            x[cold.to(device)] = self.first(denoiser, cond[cold.to(device)], (len(cold), *shape[1:]), generator)
        if warm.any():
            rows = warm.nonzero().squeeze(1).to(device)
            prev = self.memory[streams[warm].to(device)]
            k = min(self.executes, shape[1])  # shift by what was executed, repeating the last action
            guess = torch.cat([prev[:, k:], prev[:, -1:].expand(-1, k, -1)], dim=1)
            self.scheduler.set_timesteps(timesteps=self.timesteps, device=device)
            for t in self.scheduler.timesteps:
                pred = denoiser(guess, t.expand(len(rows)).to(device), cond[rows])
                guess = self.scheduler.step(pred, t, guess, generator=generator).prev_sample
            x[rows] = guess
        if self.snap is not None:
            x = self.snap(x)
        self.memory[streams.to(device)] = x
        self.warm[streams] = True
        return x


def consistency_timesteps(steps: int, num_train_timesteps: int) -> list[int]:
    """Where a `steps`-call consistency sampler evaluates its head: the top timestep, then evenly
    lower ones (1: [99]; 3: [99, 66, 33] of 100)."""
    top = num_train_timesteps - 1
    return [round(top * (steps - i) / steps) for i in range(steps)]


class ConsistencySampler:
    """Multistep consistency sampling: jump from noise to a clean chunk with the head, and for more
    than one step re-noise it to the next, lower timestep and jump again."""

    name = "consistency"
    executes = None

    def __init__(self, head: nn.Module, steps: int, training: DDPMScheduler):
        self.head, self.steps = head, steps
        self.timesteps = consistency_timesteps(steps, training.config.num_train_timesteps)
        self.scheduler = training

    @torch.no_grad()
    def __call__(self, denoiser: Denoiser, cond: torch.Tensor, shape: tuple, generator: torch.Generator | None = None,
                 streams: torch.Tensor | None = None) -> torch.Tensor:
        device = _device(cond)
        x = torch.randn(shape, generator=generator, device=device)
        for i, t in enumerate(self.timesteps):
            if i:
                noise = torch.randn(shape, generator=generator, device=device)
                x = self.scheduler.add_noise(x0, noise, torch.full((shape[0],), t, device=device))
            x0 = clip_clean(self.head.jump(x, t, cond), self.scheduler)
        return x0

    def reset(self, streams: torch.Tensor | None = None) -> None:
        """Stateless."""


def make_sampler(name: str, steps: int, training: DDPMScheduler) -> SchedulerSampler:
    """`ddpm` or `ddim` with `steps` denoiser calls, on the schedule the model was trained with.
    (`rti` and `consistency` need more than a schedule: `DiffusionPolicy.set_sampler` builds them.)"""
    if name == "ddpm":  # with steps < training timesteps: strided DDPM, fewer and larger steps
        return SchedulerSampler("ddpm", steps, DDPMScheduler.from_config(training.config))
    if name == "ddim":
        return SchedulerSampler("ddim", steps, DDIMScheduler.from_config(training.config))
    raise ValueError(f"unknown sampler '{name}'; valid: ddpm, ddim")
