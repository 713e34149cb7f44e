"""`robodistill rpd`: Refined Policy Distillation, a PPO student pulled toward a teacher's actions.

RPD (Jülg, Burgard, Walter 2025) is PPO with one more loss term:

    L = L_clip + vf_coef L_V - ent_coef H + lambda_t * distill(mu_theta(s), a_T(s))

where mu_theta(s) is the student's mean action and a_T(s) the teacher's action on the *stored*
rollout observation s (for a teacher that executes action chunks: the action its chunk, asked where
it would ask itself, assigns to s; `labels`). The teacher is queried, never executed: exploration
is the student's own.
distill is `mse` (the paper's default), `l1`, or `bc` = -log pi_theta(a_T | s). lambda_t is constant
(`distill_coef`, the paper's 1.0) or cosine-annealed to 0 over `anneal_steps` env steps, then off.
teacher=none (or distill_coef=0) is exactly the PPO baseline with identical settings.

Built on stable-baselines3: `RPD` is its `PPO` with the teacher's actions attached to the rollout
buffer and the term added to the loss (`train` below is SB3's PPO update with that one term), so a
saved student is an SB3 zip that `stable_baselines3.PPO.load` opens and `predict`s with. The teacher
is fixed during a rollout's update, so its actions are computed once per rollout, in batches, on the
stored observations (with the observation history a diffusion teacher takes, rebuilt from the
buffer's episode starts), not per minibatch per epoch as in the authors' code: the same numbers,
several times cheaper. Truncated episodes bootstrap from the value of their last observation (SB3's
time-limit handling, as ManiSkill's PPO baseline bootstraps at truncation; not its finite-horizon GAE variant);
envs reset independently (partial resets).

`teacher_obs_mode=rgb` with a state student: the training envs log the simulator state behind every
observation they return (`SB3View.log_sim_states`), and the teacher is shown camera observations of
those states, rendered by a second env (`VecEnv.observe_states`) only for the frames it is asked with,
so an RGB teacher (the VLA) costs two rendered frames per chunk instead of one per env step.

`warm_start_steps=N` (not in the paper; off by default): before PPO the teacher acts in the training
envs for N env steps (counted in total_steps), the state normaliser is fitted on its states, the
student's mean on its actions (MSE) and V on its episodes' discounted returns; then RPD as above.

`launcher=torchrun nproc=N`: N ranks, each with its own `env.num_envs` envs (seed + 1000 * rank),
rollouts of `n_steps` per env and minibatches of `batch_size`; every minibatch's gradients (and its KL, for the early stop) are averaged over
the ranks in one all-reduce, so the replicas stay identical. Env-step counts (`total_steps`,
`eval_every`, history) are global, all ranks together; rank 0 evaluates and writes checkpoints.
"""

from __future__ import annotations

import json
import math
import os
import time
import zipfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from stable_baselines3 import PPO
from gymnasium import spaces
from stable_baselines3.common.buffers import DictRolloutBuffer, RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import Logger, TensorBoardOutputFormat
from stable_baselines3.common.utils import explained_variance
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from robodistill import checkpoints
from robodistill.curves import write_run_curves
from robodistill.data.trajectories import episode_seeds
from robodistill.envs import EnvConfig, SB3View, VecEnv, make_env
from robodistill.envs.factory import AGV_TASK, OBS_MODES
from robodistill.errors import UserError
from robodistill.evaluation import HELD_OUT_SEEDS, check_apart, evaluate, rated_seeds, take_env
from robodistill.inference.chunks import ChunkExecutor
from robodistill.policies.base import NAMED_POLICIES, trained_data, trained_env
from robodistill.policies.student import GaussianStudent, NormalizedState, StateAndImage
from robodistill.policies.teachers import Teacher, load_teacher
from robodistill.summary import counted
from robodistill.training.distributed import Ranks, average_gradients, broadcast_module, describe, finish, finite_weights, replicas_identical, setup
from robodistill.training.runs import absolute_paths, check_eval_episodes, check_ppo, check_unfinished, find_resume, resumed_env, resumed_settings, set_threads
from robodistill.wire import served_env

DISTILL_LOSSES = ("mse", "l1", "bc")
SCHEDULES = ("constant", "cosine")
LABELS = ("chunk", "step")
RESUMED_SEEDS = 2**30  # past every seed a run trains from or evaluates on (numpy takes seeds below 2**32)


def resumed_seed(seed: int, steps: int) -> int:
    """The seed a run resumed at `steps` env steps reseeds SB3 with (its RNGs, and its envs' first episodes: env i's with
    this + i): repeatable from the run's seed and step count, and apart from the evaluation's seeds. seed + steps was
    those (HELD_OUT_SEEDS + seed + k) at 10,000 steps, the default first checkpoint: a resumed run began training on the
    initial states of the episodes it is rated on."""
    return RESUMED_SEEDS + seed + steps


@dataclass
class RPDConfig:
    """`robodistill rpd` (configs/rpd.yaml)."""

    env: EnvConfig = field(default_factory=EnvConfig)
    teacher: str = "none"  # a diffusion checkpoint, a bundle dir, ws://host:port (a served policy), or none: plain PPO
    api_key: str | None = None  # for a ws:// teacher; default: the ROBODISTILL_API_KEY env var
    timeout_ms: float = 30_000.0  # a ws:// teacher's request unanswered this long ends the run (as control's timeout_ms)
    total_steps: int = 200_000  # env steps, all envs (and all ranks) together
    seed: int = 0
    # RPD
    # mse | l1 (the mean action's, averaged over action dims) | bc (-log pi(a_T|s), summed over action dims as SB3's
    # log_prob is): a distill_coef tuned for one is not the same weight for another
    distill: str = "mse"
    distill_coef: float = 1.0  # lambda; 0: plain PPO
    schedule: str = "constant"  # constant | cosine (lambda * (0.5 cos(pi t / anneal_steps) + 0.5), then 0)
    anneal_steps: int | None = None  # default: total_steps
    # chunk: the teacher is asked every act_horizon steps of an episode and the steps between get the rest of
    # its chunk, as it acts itself; step: asked at every observation, its first action (re-plans every step).
    labels: str = "chunk"
    # What the teacher sees. None: the student's observations. rgb: camera observations (env.image_size) of the
    # student's simulator states, rendered only where the teacher is asked: a state student of an RGB teacher (the
    # VLA) renders two frames per teacher chunk instead of one per env step.
    teacher_obs_mode: str | None = None
    # PPO (RPD's defaults, sized for a few CPU envs)
    n_steps: int = 200  # rollout length per env
    batch_size: int = 100  # minibatch size
    n_epochs: int = 8
    lr: float = 3e-4
    gamma: float | None = None  # default: 0.8 for dense rewards, 0.99 for sparse (as RPD)
    gae_lambda: float = 0.9
    clip_range: float = 0.2
    ent_coef: float = 0.0
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    target_kl: float | None = 0.2
    normalize_advantage: bool = True  # per minibatch, as SB3
    hidden: list[int] = field(default_factory=lambda: [256, 256, 256])
    log_std_init: float = -0.5
    obs_norm_steps: int = 1000  # random-action env steps (not counted in total_steps) that fit the state normaliser (without a warm start)
    # Warm start (not in the paper; off by default): before PPO the teacher acts for this many env steps (counted in
    # total_steps), the state normaliser is fitted on its states, the student's mean to its actions and V to those
    # episodes' discounted returns.
    warm_start_steps: int = 0
    warm_start_epochs: int = 20  # passes over the warm start's steps, minibatches of batch_size
    # run
    eval_every: int = 10_000  # env steps between evaluations (success with intervals); 0: only before training (step 0) and at the end
    eval_episodes: int = 20
    checkpoint_every: int = 10_000  # env steps between atomic checkpoints/last.zip
    resume: bool = False  # continue the newest run with this name from checkpoints/last.zip
    resume_from: str | None = None  # or from this run directory / zip
    threads: int = 1  # CPU threads, all ranks together (at least one each)
    device: str = "cpu"  # the student's torch device; a small MLP updates faster on the CPU, cuda pays off with many GPU envs
    progress: bool = True
    name: str = "rpd"


class TeacherRolloutSamples(NamedTuple):
    observations: torch.Tensor
    actions: torch.Tensor
    old_values: torch.Tensor
    old_log_prob: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    teacher_actions: torch.Tensor


class TeacherActions:
    """Adds the teacher's action for every stored observation to an SB3 rollout buffer."""

    def reset(self) -> None:
        super().reset()
        self.teacher_actions = np.zeros((self.buffer_size, self.n_envs, self.action_dim), dtype=np.float32)

    def get(self, batch_size: int | None = None):
        if not self.generator_ready:  # flattened the way the parent flattens its own arrays
            self.teacher_actions = self.swap_and_flatten(self.teacher_actions)
        yield from super().get(batch_size)

    def _get_samples(self, batch_inds: np.ndarray, env=None) -> TeacherRolloutSamples:
        base = super()._get_samples(batch_inds, env)
        return TeacherRolloutSamples(*base, self.to_torch(self.teacher_actions[batch_inds]))


class TeacherRolloutBuffer(TeacherActions, RolloutBuffer):
    """obs_mode=state."""


class TeacherDictRolloutBuffer(TeacherActions, DictRolloutBuffer):
    """obs_mode=rgb (dict observations)."""


def stack_history(obs: np.ndarray, starts: np.ndarray, horizon: int, prev_obs: np.ndarray | None,
                  prev_starts: np.ndarray | None) -> np.ndarray:
    """(n, E, D) rollout observations -> (n, E, horizon, D) histories, oldest first. Before an
    episode's first observation the history repeats it (as in training and evaluation). `prev_*`:
    the previous rollout's last horizon-1 steps (None: this is the first rollout)."""
    n, envs = obs.shape[:2]
    out = np.repeat(obs[:, :, None], horizon, axis=2)
    trailing = (1,) * (obs.ndim - 2)
    if horizon == 1:
        return out
    lead = horizon - 1
    if prev_obs is None:
        prev_obs = np.repeat(obs[:1], lead, axis=0)
        prev_starts = np.ones((lead, envs), dtype=bool)
    ext_obs = np.concatenate([prev_obs, obs])
    ext_starts = np.concatenate([prev_starts.astype(bool), starts.astype(bool)])
    blocked = np.zeros((n, envs), dtype=bool)
    for j in range(1, horizon):
        blocked |= ext_starts[lead + 1 - j : lead + 1 - j + n]  # an episode began at step t - j + 1
        out[:, :, lead - j] = np.where(blocked.reshape(n, envs, *trailing), out[:, :, lead - j + 1], ext_obs[lead - j : lead - j + n])
    return out


class RPD(PPO):
    """SB3 PPO + lambda * distill(student mean, teacher action); see the module doc."""

    def __init__(self, *args, teacher: Teacher | None = None, distill: str = "mse", distill_coef: float = 1.0,
                 schedule: str = "constant", anneal_steps: int | None = None, labels: str = "chunk",
                 teacher_view: VecEnv | None = None, teacher_batch: int = 4096, ranks: Ranks = Ranks(), **kwargs):
        self.teacher, self.teacher_view, self.ranks = teacher, teacher_view, ranks
        self.distill, self.distill_coef, self.schedule = distill, distill_coef, schedule
        self.anneal_steps, self.labels, self.teacher_batch = anneal_steps, labels, teacher_batch
        self._tail: tuple[dict, np.ndarray] | None = None
        self._open: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # per env: episode step, steps into chunk, chunk
        env = kwargs.get("env", args[1] if len(args) > 1 else None)
        dict_obs = env is not None and isinstance(env.observation_space, spaces.Dict)
        super().__init__(*args, rollout_buffer_class=TeacherDictRolloutBuffer if dict_obs else TeacherRolloutBuffer, **kwargs)

    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), "teacher", "teacher_view", "_tail", "_open", "ranks"]

    @property
    def global_steps(self) -> int:
        """Env steps of all ranks together (SB3's `num_timesteps` counts this process's)."""
        return self.num_timesteps * self.ranks.world

    def dump_logs(self, iteration: int = 0) -> None:
        """SB3's, at the env steps of all ranks: SB3 writes its scalars (losses, returns, fps) at `num_timesteps`, this
        rank's, which under torchrun put them at half the step (2 ranks) of the evaluations and of history.json."""
        own = self.num_timesteps, self._num_timesteps_at_start
        self.num_timesteps, self._num_timesteps_at_start = self.global_steps, own[1] * self.ranks.world
        try:
            super().dump_logs(iteration)
        finally:
            self.num_timesteps, self._num_timesteps_at_start = own

    def coef(self) -> float:
        """lambda at the current env step."""
        if self.teacher is None or self.distill_coef == 0:
            return 0.0
        if self.schedule == "constant":
            return self.distill_coef
        horizon = self.anneal_steps or self._total_timesteps * self.ranks.world
        if self.global_steps >= horizon:
            return 0.0
        return self.distill_coef * (0.5 * math.cos(math.pi * self.global_steps / horizon) + 0.5)

    def collect_rollouts(self, env, callback, rollout_buffer, n_rollout_steps) -> bool:
        ok = super().collect_rollouts(env, callback, rollout_buffer, n_rollout_steps)
        if ok and self.coef() > 0:
            self._label(rollout_buffer)
        return ok

    @torch.no_grad()
    def _label(self, buffer: TeacherActions) -> None:
        """The teacher's action for every stored observation, in batches, once per rollout.

        A chunking teacher re-planning at every step is not the teacher that was measured (PushCube,
        10-demo Diffusion Policy: 54% with its 8-action chunks, 20% asked every step), so by default
        (labels=chunk) it is asked only where it would ask itself, every act_horizon steps from each
        episode's start, and the steps in between are labelled with the rest of that chunk. A chunk
        still open at the end of a rollout labels the start of the next one."""
        h = self.teacher.obs_horizon
        every = self.teacher.act_horizon if self.labels == "chunk" else 1
        starts = buffer.episode_starts.astype(bool)
        n, envs = starts.shape
        if self.teacher_view is None:
            obs = buffer.observations if isinstance(buffer.observations, dict) else {"state": buffer.observations}
        else:  # the simulator states behind the stored observations (the newest logged one is the next rollout's first)
            log = self.env.unwrapped.sim_log
            assert log is not None and len(log) == n + 1, "SB3View.log_sim_states(n_steps + 1) must be on before learn()"
            obs = {"sim": np.stack(list(log)[:-1])}
        step, into, carried = self._open or (np.zeros(envs, np.int64), np.zeros(envs, np.int64), None)
        ask, offset = np.zeros((n, envs), bool), np.zeros((n, envs), np.int64)
        for t in range(n):
            step = np.where(starts[t], 0, step)
            ask[t] = step % every == 0
            if t == 0 and carried is None:
                ask[0] = True
            into = np.where(ask[t], 0, into + 1)
            offset[t] = into
            step = step + 1

        prev_obs, prev_starts = self._tail if self._tail is not None else ({}, None)
        q = int(ask.sum())
        chunks = np.zeros((0, every, buffer.teacher_actions.shape[-1]), np.float32)
        if q:  # a rollout shorter than a chunk can lie wholly inside chunks asked for before it
            asked = {}
            for key, value in obs.items():
                hist = stack_history(value, starts, h, prev_obs.get(key), prev_starts)[ask]
                if key == "rgb":  # the buffer holds SB3's channel-first copy; policies take (H, W, C) uint8
                    hist = np.moveaxis(hist, -3, -1).astype(np.uint8)
                asked[key] = torch.from_numpy(hist) if key == "rgb" else torch.from_numpy(hist).float()
            if self.teacher_view is not None:
                asked = self._render(asked.pop("sim").numpy())
            chunks = np.concatenate([self.teacher.act({k: v[i : i + self.teacher_batch] for k, v in asked.items()})[:, :every].cpu().numpy()
                                     for i in range(0, q, self.teacher_batch)])
            if not np.isfinite(chunks).all():  # else the student learnt NaN, ended as if its own lr= diverged
                raise UserError("the teacher's actions are not finite (NaN or inf): its weights or normalisers are not, as a training "
                                "run that diverged leaves them: give another teacher=")
        # Chunk ids: the carried chunks are 0..envs-1, this rollout's queries follow in row-major order.
        chunks = np.concatenate([carried if carried is not None else np.zeros((envs, *chunks.shape[1:]), np.float32), chunks])
        ids = np.zeros((n, envs), np.int64)
        ids[ask] = envs + np.arange(q)
        asked_at = np.arange(n)[:, None] - offset  # < 0: the chunk carried in from the previous rollout
        chunk_of = np.where(asked_at >= 0, ids[asked_at.clip(0), np.arange(envs)], np.arange(envs))
        buffer.teacher_actions[:] = chunks[chunk_of, offset]
        self._open = (step, into, chunks[chunk_of[-1]])
        if h > 1:
            self._tail = ({k: v[-(h - 1):].copy() for k, v in obs.items()}, starts[-(h - 1):].copy())

    def _render(self, states: np.ndarray) -> dict[str, torch.Tensor]:
        """(q, h, S) simulator states -> the teacher's (q, h, ...) observations of them, each distinct
        state rendered once (an episode's first state repeats in its padded histories)."""
        q, h, size = states.shape
        unique, inverse = np.unique(states.reshape(-1, size), axis=0, return_inverse=True)
        seen = self.teacher_view.observe_states(unique)
        return {k: v.cpu()[torch.from_numpy(inverse.reshape(-1))].reshape(q, h, *v.shape[1:]) for k, v in seen.items()}

    def _distill_loss(self, dist, teacher_actions: torch.Tensor) -> torch.Tensor:
        if self.distill == "bc":
            return -dist.log_prob(teacher_actions).mean()
        mean = dist.distribution.mean
        return F.mse_loss(mean, teacher_actions) if self.distill == "mse" else F.l1_loss(mean, teacher_actions)

    def train(self) -> None:
        """SB3's PPO update (clipped surrogate, value loss, entropy, KL early stop) + the RPD term."""
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        clip_range = self.clip_range(self._current_progress_remaining)
        coef = self.coef()
        logs: dict[str, list[float]] = {k: [] for k in ("pg", "value", "entropy", "distill", "kl", "clip_fraction")}
        continue_training = True
        for epoch in range(self.n_epochs):
            for data in self.rollout_buffer.get(self.batch_size):
                dist = self.policy.get_distribution(data.observations)
                values = self.policy.predict_values(data.observations).flatten()
                log_prob, entropy = dist.log_prob(data.actions), dist.entropy()
                adv = data.advantages
                if self.normalize_advantage and len(adv) > 1:
                    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
                ratio = torch.exp(log_prob - data.old_log_prob)
                pg_loss = -torch.min(adv * ratio, adv * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)).mean()
                value_loss = F.mse_loss(data.returns, values)
                entropy_loss = -entropy.mean() if entropy is not None else log_prob.mean()
                loss = pg_loss + self.ent_coef * entropy_loss + self.vf_coef * value_loss
                if coef > 0:
                    distill_loss = self._distill_loss(dist, data.teacher_actions)
                    loss = loss + coef * distill_loss
                    logs["distill"].append(distill_loss.item())
                with torch.no_grad():
                    log_ratio = log_prob - data.old_log_prob
                    approx_kl = torch.mean(torch.exp(log_ratio) - 1 - log_ratio).item()
                self.policy.optimizer.zero_grad()
                loss.backward()
                approx_kl, = average_gradients(self.policy, self.ranks, approx_kl)  # all ranks decide the early stop alike
                logs["pg"].append(pg_loss.item())
                logs["value"].append(value_loss.item())
                logs["entropy"].append(entropy_loss.item())
                logs["kl"].append(approx_kl)
                logs["clip_fraction"].append(torch.mean((torch.abs(ratio - 1) > clip_range).float()).item())
                if self.target_kl is not None and approx_kl > 1.5 * self.target_kl:
                    continue_training = False
                    break
                nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm)
                self.policy.optimizer.step()
                finite_weights(self.policy.parameters(), f"env step {self.num_timesteps}", self.learning_rate, self.ranks,
                               self.policy.log_std)
            self._n_updates += 1
            if not continue_training:
                break
        for key, values in logs.items():
            if values:
                self.logger.record(f"train/{key}", float(np.mean(values)))
        self.logger.record("train/distill_coef", coef)
        self.logger.record("train/explained_variance",
                           explained_variance(self.rollout_buffer.values.flatten(), self.rollout_buffer.returns.flatten()))
        self.logger.record("train/std", torch.exp(self.policy.log_std).mean().item())


class ActingTeacher:
    """A teacher executing its own chunks (the Policy contract `ChunkExecutor` drives)."""

    def __init__(self, teacher: Teacher):
        self.teacher, self.obs_horizon, self.act_horizon = teacher, teacher.obs_horizon, teacher.act_horizon

    def predict_chunk(self, obs, streams=None) -> torch.Tensor:
        return self.teacher.act(obs)


class TeacherSteps(NamedTuple):
    observations: np.ndarray | dict[str, np.ndarray]  # as the student takes them (SB3View)
    actions: torch.Tensor
    returns: torch.Tensor  # discounted, within each episode
    complete: torch.Tensor  # the step's episode ended within the rollout (its return is whole)
    episodes: int
    successes: int


@torch.no_grad()
def teacher_rollout(env, vec: SB3View, teacher: Teacher, steps: int, gamma: float, seed: int,
                    view: VecEnv | None = None) -> TeacherSteps:
    """`steps` env steps (rounded up to whole rounds of the envs) of the teacher acting in the training envs,
    seeing them through `view` (`VecEnv.observe_states`) where it has one."""
    n = env.num_envs
    sees = (lambda obs: view.observe_states(env.sim_states())) if view is not None else (lambda obs: obs)  # noqa: E731
    obs = env.reset(seed=[seed + i for i in range(n)])
    executor = ChunkExecutor(ActingTeacher(teacher), n)
    executor.observe(sees(obs))
    observations, actions, rewards, dones, successes = [], [], [], [], 0
    for _ in range(math.ceil(steps / n)):
        observations.append(vec.to_numpy(obs))
        action = executor.act()
        obs, reward, terminated, truncated, info = env.step(action)
        done = (terminated | truncated).cpu()
        if done.any():
            successes += int(info["final_info"]["success"].cpu()[done].sum())
        actions.append(action.float().cpu())
        rewards.append(reward.float().cpu())
        dones.append(done)
        executor.observe(sees(obs), done)
    returns = torch.zeros(len(rewards), n)
    complete = torch.zeros(len(rewards), n, dtype=torch.bool)
    ret, ended = torch.zeros(n), torch.zeros(n, dtype=torch.bool)
    for t in reversed(range(len(rewards))):
        ret = rewards[t] + gamma * ret * ~dones[t]
        ended |= dones[t]
        returns[t], complete[t] = ret, ended
    stacked = ({k: np.concatenate([o[k] for o in observations]) for k in observations[0]} if isinstance(observations[0], dict)
               else np.concatenate(observations))
    return TeacherSteps(stacked, torch.cat(actions), returns.flatten(), complete.flatten(), int(torch.stack(dones).sum()), successes)


def warm_start(model: PPO, env, vec: SB3View, teacher: Teacher, cfg: RPDConfig, gamma: float, seed: int, ranks: Ranks) -> dict:
    """The teacher acts for `warm_start_steps` env steps (split over the ranks); the state normaliser
    is fitted on its states, the student's mean regressed on its actions and V on the episodes'
    discounted returns (steps of episodes cut off by the rollout's end leave V alone). A student from
    random init spends its first rollouts far from anything the teacher would do, and with a sparse
    reward rarely succeeds there; this one starts where the teacher is (on sparse PushCube, PPO's
    next updates still lost its successes: rpd_sparse_diagnostics.md)."""
    per_rank = math.ceil(cfg.warm_start_steps / ranks.world / env.num_envs) * env.num_envs
    data = teacher_rollout(env, vec, teacher, per_rank, gamma, seed, model.teacher_view)
    # The normaliser is fitted on the states the warm-started student is meant to act on, the teacher's, rather than
    # on random actions' (measured: no consistent difference, see rpd_sparse_diagnostics.md; no extra env steps).
    model.policy.features_extractor.fit(data.observations["state"] if isinstance(data.observations, dict) else data.observations)
    broadcast_module(model.policy, ranks)
    optimizer = torch.optim.Adam(model.policy.parameters(), lr=cfg.lr)
    generator = torch.Generator().manual_seed(seed)
    observations = model.policy.obs_to_tensor(data.observations)[0]  # once, not per minibatch (images: transposed)
    actions, returns, complete = (t.to(model.device) for t in (data.actions, data.returns, data.complete))
    model.policy.set_training_mode(True)
    for _ in tqdm(range(cfg.warm_start_epochs), desc="warm start", unit="epoch", disable=not (cfg.progress and ranks.main)):
        for idx in torch.randperm(len(actions), generator=generator).split(cfg.batch_size):
            obs = {k: v[idx] for k, v in observations.items()} if isinstance(observations, dict) else observations[idx]
            action_loss = F.mse_loss(model.policy.get_distribution(obs).distribution.mean, actions[idx])
            value_error = (model.policy.predict_values(obs).flatten() - returns[idx]) ** 2
            value_loss = (value_error * complete[idx]).sum() / complete[idx].sum().clamp_min(1)
            optimizer.zero_grad()
            (action_loss + cfg.vf_coef * value_loss).backward()
            average_gradients(model.policy, ranks)
            nn.utils.clip_grad_norm_(model.policy.parameters(), cfg.max_grad_norm)
            optimizer.step()
    model.num_timesteps = per_rank
    vec.seed(seed)  # PPO's first reset is seeded, as after fit_normalizer
    return {"env_steps": per_rank * ranks.world, "episodes": data.episodes, "teacher_successes": data.successes,
            "action_mse": action_loss.item(), "value_mse": value_loss.item()}


def fit_normalizer(model: PPO, vec: SB3View, steps: int, seed: int) -> None:
    """Fit the student's NormalizedState on `steps` env steps of uniformly random actions."""
    if steps <= 0:
        return
    rng = np.random.default_rng(seed)
    space = vec.action_space
    vec.seed(seed)
    state = lambda obs: obs["state"] if isinstance(obs, dict) else obs  # noqa: E731
    states = [state(vec.reset())]
    for _ in range(max(1, steps // vec.num_envs)):
        actions = rng.uniform(space.low, space.high, (vec.num_envs, *space.shape)).astype(np.float32)
        states.append(state(vec.step(actions)[0]))
    model.policy.features_extractor.fit(np.concatenate(states))
    vec.seed(seed)  # learn() starts from the same reset as it would have without this


class RunCallback(BaseCallback):
    """Periodic shared evaluation (success with intervals -> history.json, TensorBoard), atomic
    checkpoints, a progress bar, and training throughput with evaluation time left out."""

    def __init__(self, cfg: RPDConfig, run_dir: Path, eval_env, history: list[dict]):
        super().__init__()
        self.cfg, self.run_dir, self.eval_env, self.history = cfg, run_dir, eval_env, history
        self.bar = None
        self.next_eval = self.next_ckpt = 0
        self.eval_seconds = 0.0
        self.start = time.perf_counter()
        self.start_steps = 0

    def _on_training_start(self) -> None:
        n = self.model.global_steps
        self.start_steps = n
        self.next_eval = (n // self.cfg.eval_every + 1) * self.cfg.eval_every if self.cfg.eval_every else math.inf
        self.next_ckpt = (n // self.cfg.checkpoint_every + 1) * self.cfg.checkpoint_every
        self.bar = tqdm(total=self.cfg.total_steps, initial=n, desc="rpd", unit="step", disable=not self.cfg.progress)
        if not self.history:
            self.evaluate()  # step 0: what the student does before training

    def evaluate(self) -> dict:
        start = time.perf_counter()
        report = evaluate(GaussianStudent(self.model), self.eval_env, self.cfg.eval_episodes, seed=HELD_OUT_SEEDS + self.cfg.seed, progress=False)
        self.eval_seconds += time.perf_counter() - start
        s = report.summary
        train_seconds = time.perf_counter() - self.start - self.eval_seconds
        row = {"step": self.model.global_steps, "success_once": s["success_once"]["rate"], "ci95": s["success_once"]["ci95"],
               "success_at_end": s.get("success_at_end", {}).get("rate"), "return": s["mean_return"], "episodes": s["episodes"],
               "train_steps_per_second": (self.model.global_steps - self.start_steps) / max(train_seconds, 1e-9)}
        self.history.append(row)
        checkpoints.write_json(self.run_dir / "history.json", self.history)
        # Written now, at the step it rates: SB3's logger.record would have it drawn at its next dump, after the next
        # rollout (one rollout later than history.json has it), and the final evaluation, after learning, never.
        for out in self.logger.output_formats:
            if isinstance(out, TensorBoardOutputFormat):
                for key in ("success_once", "return"):
                    out.writer.add_scalar(f"eval/{key}", row[key], row["step"])
                out.writer.flush()
        if self.bar is not None:
            self.bar.set_postfix(refresh=False, success=f"{row['success_once']:.0%}")
        return row

    def _on_step(self) -> bool:
        self.bar.update(self.model.global_steps - self.bar.n)
        return True

    def _on_rollout_start(self) -> None:
        # Not in _on_step: SB3 steps the callback while it collects a rollout, before the update that learns from it, so
        # a rollout's last step rated the policy without that update (the final row not the saved student) and saved it
        # without it (a resumed run never learned from those steps). A rollout starts after the update of the one before.
        n = self.model.global_steps
        if n >= self.next_eval:
            self.next_eval = (n // self.cfg.eval_every + 1) * self.cfg.eval_every
            self.evaluate()
        # the run's last rollout is saved by train(), after its final evaluation and student.zip (see there)
        if n >= self.next_ckpt:
            self.next_ckpt = (n // self.cfg.checkpoint_every + 1) * self.cfg.checkpoint_every
            checkpoints.write_atomic(self.run_dir / "checkpoints" / "last.zip", self.model.save)

    def _on_training_end(self) -> None:
        self.bar.close()


def check(cfg: RPDConfig) -> None:
    if cfg.distill not in DISTILL_LOSSES:
        raise UserError(f"distill='{cfg.distill}' is not one of {', '.join(DISTILL_LOSSES)}")
    if cfg.schedule not in SCHEDULES:
        raise UserError(f"schedule='{cfg.schedule}' is not one of {', '.join(SCHEDULES)}")
    if cfg.labels not in LABELS:
        raise UserError(f"labels='{cfg.labels}' is not one of {', '.join(LABELS)}")
    if cfg.distill_coef < 0:
        raise UserError(f"distill_coef={cfg.distill_coef} must be >= 0")
    check_eval_episodes(cfg.eval_episodes, least=1)
    check_ppo(lr=cfg.lr, gamma=cfg.gamma, gae_lambda=cfg.gae_lambda, clip_range=cfg.clip_range, max_grad_norm=cfg.max_grad_norm,
              target_kl=cfg.target_kl, n_epochs=cfg.n_epochs)
    if cfg.total_steps < 1 or cfg.n_steps < 1 or cfg.batch_size < 2:
        raise UserError("total_steps and n_steps must be >= 1 and batch_size >= 2")
    rollout = cfg.n_steps * cfg.env.num_envs * int(os.environ.get("WORLD_SIZE", 1))  # every rank's envs count
    if cfg.total_steps < rollout:  # SB3 would run a whole rollout anyway, past the budget
        raise UserError(f"total_steps={cfg.total_steps} is less than one rollout (n_steps * env.num_envs * ranks = "
                        f"{rollout} env steps): raise total_steps or lower n_steps")
    if cfg.warm_start_steps < 0:
        raise UserError(f"warm_start_steps={cfg.warm_start_steps} must be >= 0 (0: no warm start)")
    if cfg.warm_start_epochs < 1:
        raise UserError(f"warm_start_epochs={cfg.warm_start_epochs} must be >= 1")
    if cfg.warm_start_steps > 0 and cfg.teacher == "none":
        raise UserError(f"warm_start_steps={cfg.warm_start_steps} needs a teacher: set teacher=... or warm_start_steps=0")
    if cfg.warm_start_steps >= cfg.total_steps:
        raise UserError(f"warm_start_steps={cfg.warm_start_steps} is counted in total_steps={cfg.total_steps}: make it smaller")
    if cfg.checkpoint_every < 1:
        raise UserError(f"checkpoint_every={cfg.checkpoint_every} must be >= 1")
    if cfg.timeout_ms <= 0:
        raise UserError(f"timeout_ms={cfg.timeout_ms} must be > 0 (how long a ws:// teacher's request may go unanswered)")
    if cfg.teacher_obs_mode is not None:
        if cfg.teacher_obs_mode not in OBS_MODES:
            raise UserError(f"teacher_obs_mode='{cfg.teacher_obs_mode}' is not one of {', '.join(OBS_MODES)} (or null: the student's)")
        if cfg.env.task == AGV_TASK:
            raise UserError(f"teacher_obs_mode renders ManiSkill simulator states; {AGV_TASK} has no camera: drop teacher_obs_mode")
        if cfg.teacher in ("none", "") or cfg.teacher.startswith(("ws://", "wss://")):
            raise UserError(f"teacher_obs_mode={cfg.teacher_obs_mode} renders observations for a local teacher checkpoint; "
                            f"teacher={cfg.teacher} is not one (a served teacher is sent the student's observations)")
    if cfg.env.obs_mode == "rgb" and cfg.env.image_size < 36:
        raise UserError(f"env.image_size={cfg.env.image_size} is too small for the student's NatureCNN: use 36 or more (64 is typical)")


def check_teacher_apart(cfg: RPDConfig) -> None:
    """Refuses to rate the student on initial states its teacher was trained on, where the teacher's file records its
    demonstrations and they are still on disk: the student learns the teacher's actions (and a warm start copies its
    acting), so it would be rated where its teacher is strongest, as distill refuses for its head."""
    taught = episode_seeds([path for path in trained_data(cfg.teacher, cfg.env.task) if path.is_file()])
    last = max((seed for seeds in taught.values() for seed in seeds), default=HELD_OUT_SEEDS)
    check_apart(taught, rated_seeds(cfg.seed, cfg.eval_episodes), "this run rates its student on",
                fix=f"teacher={cfg.teacher} was trained on them and the student learns its actions: set seed={last + 1 - HELD_OUT_SEEDS} "
                    f"or more (evaluations start at {HELD_OUT_SEEDS:,} + seed), or give a teacher trained on demonstrations planned "
                    "from other seeds")


def resume_checkpoint(cfg: RPDConfig, run_dir: Path) -> Path | None:
    """The student zip a run continues from; None for a fresh run."""
    path = find_resume(cfg.resume, cfg.resume_from, cfg.name, run_dir, filename="last.zip")
    if path is not None and not zipfile.is_zipfile(path):
        raise UserError(f"resume_from={path}: not an rpd checkpoint (an SB3 zip): give runs/rpd/<run> or its checkpoints/last.zip")
    return path


def zip_data(path: Path) -> dict:
    """What a student zip holds besides its weights (its step count, PPO settings, network), read without building its envs."""
    from stable_baselines3.common.save_util import load_from_zip_file

    return load_from_zip_file(path, load_data=True, device="cpu")[0]


def trained_steps(path: Path) -> int:
    """The env steps (all ranks together) a student zip has trained."""
    data = zip_data(path)
    return data["num_timesteps"] * data.get("robodistill_ranks", 1)


# What makes a run RPD rather than PPO, or another RPD: a resumed run keeps its own unless the command line says otherwise.
DISTILLATION = ("teacher", "teacher_obs_mode", "distill", "distill_coef", "schedule", "anneal_steps", "labels")
# How it is rated and saved: likewise, so that its history goes on with evaluations of the same size, as often.
EVALUATION = ("eval_every", "eval_episodes", "checkpoint_every")
# How it updates, as the config's fields and SB3's attributes: likewise its own unless given, and then given to the loaded model.
PPO_SETTINGS = {"n_steps": "n_steps", "batch_size": "batch_size", "n_epochs": "n_epochs", "lr": "learning_rate", "gamma": "gamma",
                "gae_lambda": "gae_lambda", "clip_range": "clip_range", "ent_coef": "ent_coef", "vf_coef": "vf_coef",
                "max_grad_norm": "max_grad_norm", "target_kl": "target_kl", "normalize_advantage": "normalize_advantage"}


def ppo_settings(data: dict) -> dict:
    """A student zip's PPO_SETTINGS and network, as the config's fields."""
    settings = {field: data[attr] for field, attr in PPO_SETTINGS.items()}
    if callable(settings["clip_range"]):  # SB3 saves the schedule it made of the float
        settings["clip_range"] = settings["clip_range"](1.0)
    network = data["policy_kwargs"]
    return {**settings, "hidden": list(network["net_arch"]["pi"]), "log_std_init": network["log_std_init"]}


def take_resumed_settings(cfg: RPDConfig, resume_path: Path, given: set[str]) -> None:
    """Takes the DISTILLATION, EVALUATION and PPO_SETTINGS of the run `resume_path` belongs to (its .hydra/config.yaml,
    or the zip's own where it has none) that `given` leaves unset and that differ, and says so: `rpd resume=true` after
    `rpd teacher=X` goes on with teacher X, not as the plain PPO that the default teacher=none is. They are written
    into this run's .hydra/config.yaml too, so that resuming this run again keeps them. The student's network is
    its weights': another `hidden` or `log_std_init` is refused."""
    trained = ppo_settings(zip_data(resume_path))
    for key in ("hidden", "log_std_init"):
        if key in given and getattr(cfg, key) != trained[key]:
            raise UserError(f"{key}={getattr(cfg, key)}: the resumed run's student was built with {key}={trained[key]} "
                            f"({resume_path}); drop {key}= to continue it (or train a new student, without resume)")
    saved = resume_path.parent.parent / ".hydra" / "config.yaml"
    earlier = OmegaConf.to_container(OmegaConf.load(saved)) if saved.is_file() else trained  # a zip kept outside its run directory
    for key, value in resumed_settings(cfg, earlier, (*DISTILLATION, *EVALUATION, *PPO_SETTINGS, "hidden", "log_std_init"), given).items():
        setattr(cfg, key, value)


def train(cfg: RPDConfig, run_dir: Path) -> dict:
    check(cfg)
    ranks, device = setup(cfg.device)
    set_threads(cfg.threads, ranks.world)
    seed = cfg.seed + 1000 * ranks.rank  # each rank its own envs and exploration; rank 0's weights for all
    run_dir.mkdir(parents=True, exist_ok=True)
    dense = (cfg.env.reward_mode or "normalized_dense") != "sparse"
    gamma = cfg.gamma if cfg.gamma is not None else (0.8 if dense else 0.99)
    env = make_env(cfg.env)
    eval_env = make_env(cfg.env, ignore_terminations=True)
    view = None
    try:
        if cfg.teacher_obs_mode not in (None, cfg.env.obs_mode):
            view = make_env(replace(cfg.env, obs_mode=cfg.teacher_obs_mode, num_envs=1))
        teacher = load_teacher(cfg.teacher, view or eval_env, cfg.api_key, cfg.timeout_ms)
        if cfg.distill_coef > 0 or cfg.warm_start_steps > 0:
            check_teacher_apart(cfg)
        vec = SB3View(env)
        if view is not None:
            vec.log_sim_states(cfg.n_steps + 1)
        rpd = {"teacher": teacher, "distill": cfg.distill, "distill_coef": cfg.distill_coef, "schedule": cfg.schedule,
               "anneal_steps": cfg.anneal_steps, "labels": cfg.labels, "teacher_view": view, "ranks": ranks}
        resume_path = resume_checkpoint(cfg, run_dir)
        history: list[dict] = []
        if resume_path is not None:
            # the zip remembers the old run's TensorBoard folder: this run logs into its own
            # as the run was unless the command line changed them (see take_resumed_settings)
            ppo = {attr: getattr(cfg, field) for field, attr in PPO_SETTINGS.items()} | {"gamma": gamma}
            model = RPD.load(resume_path, env=vec, device=device, tensorboard_log=str(run_dir / "tb") if ranks.main else None, **rpd, **ppo)
            model.num_timesteps = model.num_timesteps * getattr(model, "robodistill_ranks", 1) // ranks.world
            old = resume_path.parent.parent / "history.json"
            # evaluations after the checkpoint were lost with the kill: the resumed run makes them again
            history = [row for row in json.loads(old.read_text()) if row["step"] <= model.global_steps] if old.is_file() else []
            model.set_random_seed(resumed_seed(seed, model.num_timesteps))
            if ranks.main:
                print(f"resumed from {resume_path} at step {model.global_steps}")
        else:
            rgb = cfg.env.obs_mode == "rgb"
            model = RPD("MultiInputPolicy" if rgb else "MlpPolicy", vec, n_steps=cfg.n_steps, batch_size=cfg.batch_size, n_epochs=cfg.n_epochs,
                        learning_rate=cfg.lr, gamma=gamma, gae_lambda=cfg.gae_lambda, clip_range=cfg.clip_range,
                        ent_coef=cfg.ent_coef, vf_coef=cfg.vf_coef, max_grad_norm=cfg.max_grad_norm, target_kl=cfg.target_kl,
                        normalize_advantage=cfg.normalize_advantage,
                        policy_kwargs={"net_arch": {"pi": list(cfg.hidden), "vf": list(cfg.hidden)}, "activation_fn": nn.Tanh,
                                       "log_std_init": cfg.log_std_init, "features_extractor_class": StateAndImage if rgb else NormalizedState},
                        tensorboard_log=str(run_dir / "tb") if ranks.main else None, seed=seed, device=device, **rpd)
            if cfg.warm_start_steps == 0:
                fit_normalizer(model, vec, cfg.obs_norm_steps, seed)
                broadcast_module(model.policy, ranks)
            else:
                w = warm_start(model, env, vec, teacher, cfg, gamma, seed, ranks)
                if ranks.main:
                    print(f"warm start: the teacher ran {w['env_steps']} env steps ({w['episodes']} episodes ended, "
                          f"{w['teacher_successes']} successes); last minibatch: action MSE {w['action_mse']:.4f}, "
                          f"value MSE {w['value_mse']:.4f}")
        if not ranks.main:  # only rank 0 logs; SB3's default logger would leave an empty /tmp/SB3-<date> folder per rank
            model.set_logger(Logger(folder=None, output_formats=[]))
        # Saved in the zip: what export and eval need to know, and how many ranks counted its steps.
        model.robodistill_env, model.robodistill_ranks = asdict(cfg.env), ranks.world
        callback = RunCallback(cfg, run_dir, eval_env, history) if ranks.main else None
        model.learn(math.ceil(max(0, cfg.total_steps - model.global_steps) / ranks.world), callback=callback,
                    reset_num_timesteps=False, tb_log_name="rpd")
        if ranks.main:
            if cfg.eval_every == 0 or history[-1]["step"] != model.global_steps:
                callback.evaluate()
            # last.zip at the full budget comes last: a run killed before (in the final evaluation, say) resumes from
            # the checkpoint before and makes the rest again, where that one would be refused as already trained.
            checkpoints.write_atomic(run_dir / "student.zip", model.save)
            checkpoints.write_atomic(run_dir / "checkpoints" / "last.zip", model.save)
        in_sync = replicas_identical(model.policy, ranks)
    finally:
        for e in (env, eval_env, view):
            if e is not None:
                e.close()
    finish(ranks)
    return {"history": history, "student": str(run_dir / "student.zip"), "ranks": ranks.world,
            "gradient_exchange": ranks.exchange, "replicas_identical": in_sync, "main": ranks.main}


def main(cfg: DictConfig) -> dict:
    from hydra.core.hydra_config import HydraConfig

    from robodistill.configs import given_fields, record_taken

    container = OmegaConf.to_container(cfg, resolve=True)
    container["env"] = EnvConfig.from_mapping(container["env"])
    config = RPDConfig(**container)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    resume_path = resume_checkpoint(config, run_dir)
    if resume_path is not None:
        config.env = resumed_env(config.env, resume_path, given_fields())
        take_resumed_settings(config, resume_path, given_fields())
        check_unfinished(resume_path, trained_steps(resume_path), config.total_steps, "total_steps", "env step")
    else:  # the student acts in the teacher's action space and episode limit unless told otherwise: a teacher trained
        # on 100-step episodes of 70-step demos never finishes PushCube's default 50. What it sees is the student's choice.
        served = config.teacher.startswith(("ws://", "wss://"))
        if not served and config.teacher not in ("none", *NAMED_POLICIES):
            # recorded absolute, so that resume=true (which takes the run's teacher) finds it from any directory
            config.teacher = absolute_paths(config.teacher)
            record_taken({"teacher": config.teacher})
        recorded = served_env(config.teacher, config.api_key) if served else trained_env(config.teacher)
        config.env = take_env(config.env, recorded, given_fields(), ("control_mode", "max_episode_steps", "image_size"), who="the teacher")
        sees = recorded.get("obs_mode")
        if not served and config.teacher_obs_mode is None and sees not in (None, config.env.obs_mode):
            # the loader's own "set env.obs_mode=rgb" alone makes an RGB student, whose CNN a small teacher camera cannot feed
            raise UserError(f"teacher={config.teacher} sees {sees} observations, the student {config.env.obs_mode} ones: add "
                            f"teacher_obs_mode={sees} (the teacher is shown its {sees} observations of the student's simulator "
                            f"states), or set env.obs_mode={sees} (a student that sees them too)")
    result = train(config, run_dir)
    if not result["main"]:
        return result
    if result["ranks"] > 1:
        print(describe(result))
    last = result["history"][-1]
    lo, hi = last["ci95"]
    print(f"{config.env.task}: {last['step']} env steps, success_once {last['success_once']:.0%} [{lo:.0%}, {hi:.0%}] "
          f"over {counted(last['episodes'], 'episode')}; {last['train_steps_per_second']:.0f} training env steps/s")
    print(f"student: {result['student']}  (stable_baselines3.PPO.load opens it; robodistill eval policy=... evaluates it)")
    write_run_curves(run_dir, "rpd")
    return result
