"""Samplers: turn a denoiser into action chunks. They know schedulers, never a policy class.

A denoiser is any callable `(x_t (B, H, A), t (B,) long, cond) -> prediction` of the kind the
scheduler was trained for (epsilon or sample). Every sampler has the same call:
`sampler(denoiser, cond, shape, generator) -> x_0`, so new ones (RTI warm start, a consistency
head) plug in without touching the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from diffusers import DDIMScheduler, DDPMScheduler

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Sampler(Protocol):
    name: str
    steps: int  # denoiser calls per chunk

    def __call__(self, denoiser: Denoiser, cond: torch.Tensor, shape: tuple, generator: torch.Generator | None = None) -> torch.Tensor: ...


def make_training_scheduler(num_train_timesteps: int = 100, beta_schedule: str = "squaredcos_cap_v2", prediction_type: str = "epsilon") -> DDPMScheduler:
    """The noise schedule a diffusion policy is trained with (and saved with)."""
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
        clip_sample=True, prediction_type=prediction_type,
    )


@dataclass
class SchedulerSampler:
    """DDPM (stochastic) or DDIM (deterministic, eta=0) over `steps` of the training timesteps."""

    name: str
    steps: int
    scheduler: DDPMScheduler | DDIMScheduler

    @torch.no_grad()
    def __call__(self, denoiser: Denoiser, cond: torch.Tensor, shape: tuple, generator: torch.Generator | None = None) -> torch.Tensor:
        device = cond.device if isinstance(cond, torch.Tensor) else next(iter(cond.values())).device
        x = torch.randn(shape, generator=generator, device=device)
        self.scheduler.set_timesteps(self.steps, device=device)
        for t in self.scheduler.timesteps:
            pred = denoiser(x, t.expand(shape[0]).to(device), cond)
            x = self.scheduler.step(pred, t, x, generator=generator).prev_sample
        return x


SAMPLERS = ("ddpm", "ddim")


def make_sampler(name: str, steps: int, training: DDPMScheduler) -> Sampler:
    """`ddpm` or `ddim` with `steps` denoiser calls, on the schedule the model was trained with."""
    if name == "ddpm":  # with steps < training timesteps: strided DDPM, fewer and larger steps
        return SchedulerSampler("ddpm", steps, DDPMScheduler.from_config(training.config))
    if name == "ddim":
        return SchedulerSampler("ddim", steps, DDIMScheduler.from_config(training.config))
    raise ValueError(f"unknown sampler '{name}'; valid: {', '.join(SAMPLERS)}")
