"""The denoising chain of a Diffusion Policy as a policy with likelihoods (DPPO / RL-100).

Each of the K DDIM steps x_k -> x_{k-1} is a Gaussian, N(mu_theta(x_k, t_k, s), std^2 I): mu is the
deterministic DDIM (eta=0) update through the denoiser's clean-chunk estimate, and `std` is a fixed
exploration noise (DPPO's minimum denoising std, 0.1 in normalised action units), clipped at
`noise_clip` standard deviations. The chain's mean path is therefore exactly the policy's `ddim`
sampler with K steps: a fine-tuned policy stays a plain diffusion checkpoint that `eval`, `distill`
and `export` take as they are.

`sample` draws a chain and returns it with the per-step log-likelihoods; `log_prob` scores a stored
chain under the current weights. Both serve the offline and the online stage. Only the last
`finetune_steps` steps carry a likelihood (and so a PPO ratio) and only they are noised: the earlier
steps run the mean path, so with `finetune_steps=1` a draw is the deployed action plus Gaussian noise
and PPO improves the policy `eval` runs (noise on steps PPO cannot credit would only blur the
executed action). The denoiser is one network, so earlier steps see the update too (DPPO keeps a
frozen copy for them; one network keeps the checkpoint a standard one).
"""

from __future__ import annotations

import math

import torch
from diffusers import DDIMScheduler

from robodistill.errors import UserError
from robodistill.inference.samplers import ddim_step
from robodistill.policies.diffusion.policy import DiffusionPolicy

# DPPO clamps each dimension's log-likelihood to [-5, 2] at its std of 0.1, which bounds the ratio of rare draws;
# the upper end never binds there. Held as a distance below the density's peak, the floor means the same at any std:
# a fixed upper clamp of 2 flattens every draw near the mean once std < 0.08, and with it the gradient (PickCube at
# std 0.03).
LOGPROB_FLOOR = -math.log(0.1 * math.sqrt(2 * math.pi)) + 5.0  # nats below the peak: DPPO's -5 at std 0.1


def check_chain(steps: int, finetune_steps: int, std: float) -> None:
    """The chain settings that need no policy: checked before any work (the policy bounds `steps` from above)."""
    if steps < 1:
        raise UserError(f"chain.steps={steps} must be >= 1")
    if not 1 <= finetune_steps <= steps:
        raise UserError(f"chain.finetune_steps={finetune_steps} must be between 1 and chain.steps={steps}")
    if std <= 0:
        raise UserError(f"chain.std={std} must be > 0: it is the exploration noise of every fine-tuned denoising step")


class DenoisingChain:
    def __init__(self, policy: DiffusionPolicy, steps: int = 10, finetune_steps: int | None = None, std: float = 0.1,
                 noise_clip: float = 3.0):
        n = policy.cfg.num_train_timesteps
        finetune_steps = steps if finetune_steps is None else finetune_steps
        check_chain(steps, finetune_steps, std)
        if steps > n:
            raise UserError(f"chain.steps={steps} must be between 1 and the policy's {n} training timesteps")
        self.policy, self.steps, self.finetune_steps, self.std, self.noise_clip = policy, steps, finetune_steps, std, noise_clip
        self.peak_log_prob = -math.log(std * math.sqrt(2 * math.pi))
        ddim = DDIMScheduler.from_config(policy.noise_scheduler.config)
        ddim.set_timesteps(steps)
        self.timesteps = ddim.timesteps.tolist()
        alphas = policy.noise_scheduler.alphas_cumprod
        prev = [t - n // steps for t in self.timesteps]
        self.alpha = alphas[self.timesteps].float()
        self.alpha_prev = torch.stack([alphas[p] if p >= 0 else torch.tensor(1.0) for p in prev]).float()

    @property
    def shape(self) -> tuple[int, int]:
        return self.policy.cfg.pred_horizon, self.policy.dims["action_dim"]

    def mean(self, x: torch.Tensor, k: int, cond: torch.Tensor) -> torch.Tensor:
        """The DDIM (eta=0) update of step k (0: the noisiest) from x."""
        t = torch.full((x.shape[0],), self.timesteps[k], device=x.device, dtype=torch.long)
        a, a_prev = self.alpha[k].to(x.device), self.alpha_prev[k].to(x.device)
        return ddim_step(self.policy.denoiser(x, t, cond), x, a, a_prev, self.policy.noise_scheduler)

    def _step_log_prob(self, mean: torch.Tensor, x_next: torch.Tensor) -> torch.Tensor:
        """Mean over the executed actions' dimensions of the clamped per-dimension log-likelihood, (B,).
        As DPPO: the chunk's other actions never reach the env, so their noise only added variance to
        the ratio. A mean that is not finite (weights a diverged update left finite but too large) raises
        FloatingPointError, which the training stage words as its divergence; Normal would raise its own
        "Expected parameter loc" traceback after the same device sync."""
        if not bool(torch.isfinite(mean).all()):
            raise FloatingPointError("the denoising chain's mean is not finite")
        logp = torch.distributions.Normal(self.executed(mean), self.std).log_prob(self.executed(x_next))
        return logp.clamp(min=self.peak_log_prob - LOGPROB_FLOOR).mean(1)

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, generator: torch.Generator | None = None, deterministic: bool = False):
        """A chain from noise: `chain` (B, K + 1, H, A), x_K first and the chunk x_0 last, and the
        log-likelihood of each fine-tuned step, (B, finetune_steps). `deterministic`: the mean path
        (x_K is still drawn: pass a seeded generator for common random numbers)."""
        b = cond.shape[0]
        x = torch.randn((b, *self.shape), generator=generator, device=cond.device)
        chain, logps = [x], []
        first = self.steps - self.finetune_steps
        for k in range(self.steps):
            mu = self.mean(x, k, cond)
            if deterministic or k < first:
                x = mu
            else:
                z = torch.randn(mu.shape, generator=generator, device=mu.device).clamp(-self.noise_clip, self.noise_clip)
                x = mu + self.std * z
            chain.append(x)
            if k >= first:
                logps.append(self._step_log_prob(mu, x))
        return torch.stack(chain, 1), torch.stack(logps, 1)

    def log_prob(self, cond: torch.Tensor, chain: torch.Tensor) -> torch.Tensor:
        """Log-likelihoods (B, finetune_steps) of a stored chain's fine-tuned steps under the current
        weights (with gradient)."""
        first = self.steps - self.finetune_steps
        out = [self._step_log_prob(self.mean(chain[:, k], k, cond), chain[:, k + 1]) for k in range(first, self.steps)]
        return torch.stack(out, 1)

    def executed(self, chunk: torch.Tensor) -> torch.Tensor:
        """The executed part of a model-space chunk, flattened: what the critics see as the action."""
        start = self.policy.obs_horizon - 1
        return chunk[:, start : start + self.policy.cfg.act_horizon].flatten(1)


class ChainSampler:
    """The stochastic chain as a policy's sampler (Sampler protocol): exploration in rollouts."""

    name = "chain"
    executes = None

    def __init__(self, chain: DenoisingChain):
        self.chain, self.steps = chain, chain.steps

    def __call__(self, denoiser, cond: torch.Tensor, shape: tuple, generator: torch.Generator | None = None,
                 streams: torch.Tensor | None = None) -> torch.Tensor:
        return self.chain.sample(cond, generator)[0][:, -1]

    def reset(self, streams: torch.Tensor | None = None) -> None:
        """Stateless."""
