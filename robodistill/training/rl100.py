"""`robodistill rl100`: imitation, then OPE-gated offline PPO over the denoising chain, then online
PPO, then a one-step head (RL-100, Lei et al. 2025; DPPO, Ren et al. 2025).

Stages, in order (`stages=`), each resumable and runnable alone from a checkpoint (`init=`):

1. imitation: `train-teacher` on the demos (a Diffusion Policy, K-step DDIM).
2. offline, `offline.iterations` times: roll the reference policy out (its stochastic chain) and add
   the episodes to a buffer that starts with the demos; fit IQL critics Q, V and a dynamics
   ensemble on the buffer; then PPO over the denoising chain, the actor restarting from the
   reference: chains drawn from the reference policy on buffer states, advantage
   A = Q(s, a_0) - V(s) (normalised) shared by every fine-tuned denoising step, per-step clipped
   ratios. Every `gate_every` updates the candidate
   is scored by AM-Q (mean-path rollouts in the learned model, RL-100's gate, less a MOPO-style
   penalty for the model ensemble's disagreement along them) and FQE; it becomes the reference
   only if the gate's estimate is no worse than the reference's (`gate_margin`).
   Both estimates and the candidate's true success in simulation are logged for every decision.
3. online: PPO on the same per-step objective with env-level GAE in the simulator (sparse reward,
   gamma per env step, within a chunk too, so gamma ** act_horizon between decisions; truncation
   bootstraps from V). With `online.eval_every`, the mean path is evaluated from the start on and the best one is the stage's policy.
4. distill: RL-100's same-noise one-step head (`robodistill distill variant=regression`) of the
   final policy.

Every stage ends with its policy evaluated on `eval_episodes` fixed-seed episodes; report.json,
report.md and ope.png (estimate vs the true discounted success it estimates, per candidate) are
rewritten after each stage.
Env seeds are laid out in SEEDS: the stages' ratings at 10,000 + seed + k as every trainer's, the gate's
truth and the online evaluations in blocks of their own, and the training episodes (offline collection,
online) in a block per run seed above them all, so that no budget trains on an initial state an
evaluation rates or that another seed's run trains on.
Policies are written as ordinary diffusion checkpoints (the chain's mean path is the `ddim`
sampler), so `robodistill eval/export/distill` take them unchanged. State observations only.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from robodistill import checkpoints
from robodistill.curves import draw_line, save_figure
from robodistill.data import load_episodes
from robodistill.data.trajectories import Episode, episode_seeds
from robodistill.envs import EnvConfig, make_env, zero_action_holds_still
from robodistill.errors import UserError
from robodistill.evaluation import HELD_OUT_SEEDS, TRAINED_FIELDS, check_apart, env_for_policy, evaluate, take_env, wilson_interval
from robodistill.inference.chunks import ChunkExecutor
from robodistill.policies.base import trained_data
from robodistill.policies.diffusion.chain import ChainSampler, DenoisingChain, check_chain
from robodistill.policies.diffusion.policy import KIND, DiffusionPolicy, from_checkpoint
from robodistill.summary import counted
from robodistill.training.advantages import gae
from robodistill.training.critics import IQL, DynamicsEnsemble, Transitions, am_q, fqe, mlp
from robodistill.training.distributed import diverged
from robodistill.training.runs import (absolute_paths, budget_spent, command_line, latest_run, resumed_settings, set_threads, setting,
                                      tensorboard, with_fields)

STAGES = ("imitation", "offline", "online", "distill")
GATES = {"amq": ("amq",), "fqe": ("fqe",), "both": ("amq", "fqe")}  # the estimators whose verdicts must all be "no worse"

# Env reset seeds, per purpose: (first seed, seeds each run seed may use, distance between two run seeds' first
# seeds). Evaluations step 1 per run seed, so every seed's policies are rated on nearly the same states (common random
# numbers); the stages' rating keeps HELD_OUT_SEEDS + seed, as every trainer's, so published ratings stay comparable.
# Each training purpose has a block per run seed, above every evaluation and every seed `robodistill demos` plans
# from: no run seed in range(RUN_SEEDS) and no budget check() lets through trains on an initial state an evaluation
# rates (the online evaluations pick the kept policy, so they would flatter it) or on another run seed's. Under
# 2 ** 32, ManiSkill's limit (and torch's: it keeps a seed's low 32 bits). Only each env's first episode of a collection,
# or of an online (re)start, is reset with a seed; the later ones are laid out by torch's RNG in this process (which
# collect_seeds() seeds from a block of its own, apart from the reset seeds that lay out a first episode with it too),
# or in an env worker process (env.num_envs > 1 on the CPU) from AUTO_RESET_SEEDS (envs/vector.py), by draws its first one seeds.
RUN_SEEDS = 1000
SEEDS = {
    "rating": (HELD_OUT_SEEDS, 9_000_000, 1),  # each stage's policy, eval_episodes
    "gate_truth": (20_000_000, 9_000_000, 1),  # the OPE gate's simulated truth, one per env
    "online_eval": (30_000_000, 9_000_000, 1),  # online.eval_every's evaluations, online.eval_episodes
    "collect": (1_000_000_000, 1_000_000, 2_000_000),  # offline rollouts, env.num_envs per iteration
    "online": (1_001_000_000, 1_000_000, 2_000_000),  # online training, online.envs per (re)start
    "collect_draws": (3_000_000_000, 1_000_000, 1_000_000),  # torch's seed while collecting, one per offline iteration
}


def env_seed(purpose: str, run_seed: int, index: int = 0) -> int:
    """The reset seed of the `index`-th seeded episode a run with `run_seed` starts for `purpose` (SEEDS)."""
    first, _, stride = SEEDS[purpose]
    return first + stride * run_seed + index


def check_seeds(purpose: str, needed: int, given: str) -> None:
    """Refuses a budget (`given`, as the command line sets it) that needs more seeded episodes than its block holds."""
    if needed > SEEDS[purpose][1]:
        raise UserError(f"{given}: needs {needed:,} seeded {purpose} episodes per run, past the {SEEDS[purpose][1]:,} rl100 keeps "
                        "apart for them (so that no training episode starts where an evaluation or another seed's run does): lower it")


def collect_seeds(run_seed: int, iteration: int, envs: int) -> tuple[int, int]:
    """Offline iteration `iteration`'s (from 1) first reset seed, and the seed of torch's draws while it collects (the
    chain's noise; in this process, the later episodes' starts too)."""
    return env_seed("collect", run_seed, (iteration - 1) * envs), env_seed("collect_draws", run_seed, iteration - 1)


@dataclass
class ImitationConfig:
    iterations: int = 20000
    minutes: float | None = 8.0  # also stop after this much training time
    batch_size: int = 256


@dataclass
class ChainConfig:
    steps: int = 10  # K: DDIM denoising steps (RL-100: 10 of 100 training timesteps)
    finetune_steps: int = 10  # K': the last steps that get a likelihood, a PPO ratio and exploration noise
    std: float = 0.1  # exploration noise of each fine-tuned denoising step (DPPO's minimum std), normalised units
    noise_clip: float = 3.0  # draws clipped to +-noise_clip std (DPPO)


@dataclass
class OfflineConfig:
    iterations: int = 3
    collect_episodes: int = 20  # rollouts of the reference policy added to the buffer per iteration
    critic_steps: int = 3000  # IQL gradient steps per iteration
    dynamics_steps: int = 2000  # dynamics-ensemble gradient steps per iteration
    updates: int = 200  # PPO updates per iteration
    gate_every: int = 50  # updates between OPE gates
    batch_size: int = 256
    lr: float = 1e-5  # actor; decayed linearly to 0 over all iterations (RL-100)
    clip: float = 0.25  # PPO ratio clip; decayed linearly like lr
    expectile: float = 0.7
    ensemble: int = 5
    amq_horizon: int = 5  # decisions rolled out in the learned model (x act_horizon env steps)
    amq_penalty: float = 2.0  # AM-Q = mean Q - amq_penalty x model disagreement (0: RL-100's plain AM-Q; at 0 a 96% -> 80% PushCube candidate scored higher)
    fqe_steps: int = 2000
    gate: str = "amq"  # the estimator that decides: amq (RL-100), fqe, or both (each must say no worse)
    gate_margin: float = 0.0  # accept if estimate(candidate) >= estimate(reference) - margin
    gate_eval_episodes: int = 20  # true (discounted) success of each candidate in simulation (logged, never used to decide)


@dataclass
class OnlineConfig:
    env_steps: int = 20000
    envs: int = 1
    decisions: int = 128  # chunks per env per update (x act_horizon env steps; at 32 the PPO batches were so noisy that lr 1e-4 collapsed PushCube to 0%)
    epochs: int = 5
    minibatch: int = 64
    lr: float = 3e-5  # actor (PushCube, 30k steps from a 53% teacher: 66% at 3e-5 with 128-decision batches; RL-100 uses 3e-6..1e-5 on far larger batches)
    critic_lr: float = 1e-3
    clip: float = 0.2  # PPO ratio clip at the last denoising step
    clip_noisiest: float | None = None  # clip at the noisiest fine-tuned step, rising exponentially to `clip` (DPPO: 0.001 -> 0.01); None: `clip` at every step
    gae_lambda: float = 0.95
    denoise_discount: float = 1.0  # DPPO's gamma_denoise (0.99 there): fine-tuned step j's advantage x this ** (K' - 1 - j), the noisiest step least; 1: RL-100's equal weights
    critic_warmup: int = 0  # first updates that train only the critic (DPPO's n_critic_warmup_itr): no actor step on a fresh V's advantages
    eval_every: int = 0  # updates between evaluations of the mean path; > 0 keeps the best evaluated policy (the start included) as the stage's policy
    eval_episodes: int = 50  # per evaluation, fixed seeds apart from the stage's final evaluation


@dataclass
class HeadConfig:
    iterations: int = 3000
    minutes: float | None = 3.0


@dataclass
class RL100Config:
    """`robodistill rl100` (configs/rl100.yaml)."""

    env: EnvConfig = field(default_factory=EnvConfig)
    dataset: str = ""  # demos (.h5; several: dataset='a.h5,b.h5', quoted): imitation data and the offline buffer's start
    init: str | None = None  # a diffusion checkpoint to start from instead of the imitation stage
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    imitation: ImitationConfig = field(default_factory=ImitationConfig)
    chain: ChainConfig = field(default_factory=ChainConfig)
    offline: OfflineConfig = field(default_factory=OfflineConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    gamma: float = 0.99  # per env step
    eval_episodes: int = 200  # each stage's policy, fixed seeds
    resume: bool = False  # continue the newest run with this name, with its settings (RESUMED): finished stages are kept, the rest continue there
    resume_from: str | None = None  # or this rl100 run directory
    threads: int = 1
    seed: int = 0
    name: str = "rl100"


# What a resumed run keeps of its own (its .hydra/config.yaml) unless the command line sets it: every setting it was started
# with, so that `resume=true` alone goes on as the run was, not with the defaults. Its env is report.json's (main); where
# it is written (name) and the threads it may use are this command's.
RESUMED = ("dataset", "init", "stages", "gamma", "eval_episodes", "seed",
           *(f"{group}.{f.name}" for group, kind in (("imitation", ImitationConfig), ("chain", ChainConfig), ("offline", OfflineConfig),
                                                     ("online", OnlineConfig), ("head", HeadConfig)) for f in fields(kind)))
# Those a resume may not change: every stage trains or is rated with them, so the finished stages' results would not be
# the rest's. (init is checked against the start the run rated, check_same_start.)
FROZEN = ("dataset", "seed", "gamma", "eval_episodes", *(k for k in RESUMED if k.startswith("chain.")))
# The stage whose own settings a group holds: frozen too once that stage has finished, for it is kept as it ran.
STAGE_OF = {"imitation": "imitation", "offline": "offline", "online": "online", "head": "distill"}
# Those that shape the saved state of their stage's run (its state.pt: the dynamics ensemble's members): frozen too once
# the stage has one, which would not load into another shape.
SHAPES_STATE = ("offline.ensemble",)


def check(cfg: RL100Config) -> None:
    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown or not cfg.stages:
        raise UserError(f"stages={cfg.stages}: each must be one of {', '.join(STAGES)}")
    if cfg.env.obs_mode != "state":
        raise UserError(f"rl100 takes env.obs_mode=state (its critics and dynamics model read states), got {cfg.env.obs_mode}")
    if cfg.init is None and "imitation" not in cfg.stages and not (cfg.resume or cfg.resume_from):
        raise UserError("without the imitation stage, give init=<a train-teacher or rl100 checkpoint> to start from")
    if cfg.init is not None and "imitation" in cfg.stages:
        raise UserError(f"init={cfg.init} and the imitation stage both give the starting policy: drop init= or "
                        "start after imitation, e.g. stages=[offline,online,distill]")
    if cfg.init is not None and not Path(cfg.init).is_file():
        raise UserError(f"init={cfg.init}: no such checkpoint file")
    if not cfg.dataset and ({"imitation", "offline"} & set(cfg.stages)):
        raise UserError("dataset= is required for the imitation and offline stages: the .h5 written by `robodistill demos`")
    mode = cfg.env.control_mode
    if "online" in cfg.stages and not zero_action_holds_still(mode):
        raise UserError(f"env.control_mode={mode}: the online stage holds an env whose episode ends mid-chunk still with "
                        "a zero action, which means 'stay' only under a delta or velocity control mode (e.g. pd_ee_delta_pos)")
    check_chain(cfg.chain.steps, cfg.chain.finetune_steps, cfg.chain.std)
    if cfg.offline.gate not in GATES:
        raise UserError(f"offline.gate='{cfg.offline.gate}' is not one of {', '.join(GATES)}")
    if cfg.offline.gate_every < 1 or cfg.online.decisions < 1 or cfg.online.envs < 1:
        raise UserError("offline.gate_every, online.decisions and online.envs must be >= 1")
    for flag, clip in (("clip", cfg.online.clip), ("clip_noisiest", cfg.online.clip_noisiest)):
        if clip is not None and clip <= 0:
            raise UserError(f"online.{flag}={clip} must be > 0 (a PPO ratio clip)")
    if cfg.online.eval_every < 0:
        raise UserError(f"online.eval_every={cfg.online.eval_every} must be >= 0 (0: no evaluations, the last policy is kept)")
    if cfg.eval_episodes < 1 or cfg.offline.gate_eval_episodes < 1:
        raise UserError(f"eval_episodes={cfg.eval_episodes} and offline.gate_eval_episodes={cfg.offline.gate_eval_episodes} "
                        "must be >= 1: the stage report is success rates")
    if cfg.online.eval_episodes < 1:
        raise UserError(f"online.eval_episodes={cfg.online.eval_episodes} must be >= 1")
    if cfg.online.critic_warmup < 0:
        raise UserError(f"online.critic_warmup={cfg.online.critic_warmup} must be >= 0 (updates that train only the critic)")
    if not 0 < cfg.online.denoise_discount <= 1:
        raise UserError(f"online.denoise_discount={cfg.online.denoise_discount} must be in (0, 1] (DPPO's gamma_denoise, 0.99; 1: no discount)")
    if cfg.offline.amq_penalty < 0:
        raise UserError(f"offline.amq_penalty={cfg.offline.amq_penalty}: must be >= 0 (a negative one rewards leaving the data; 0 is RL-100's plain AM-Q)")
    if not 0 <= cfg.seed < RUN_SEEDS:
        raise UserError(f"seed={cfg.seed}: rl100 takes a seed from 0 to {RUN_SEEDS - 1} (each has its own blocks of training env "
                        "seeds, apart from every other seed's and from every evaluation's)")
    check_seeds("rating", cfg.eval_episodes, f"eval_episodes={cfg.eval_episodes}")
    check_seeds("online_eval", cfg.online.eval_episodes, f"online.eval_episodes={cfg.online.eval_episodes}")
    check_seeds("gate_truth", cfg.env.num_envs, f"env.num_envs={cfg.env.num_envs}")
    check_seeds("collect", cfg.offline.iterations * cfg.env.num_envs,  # and so collect_draws' offline.iterations
                f"offline.iterations={cfg.offline.iterations} (x env.num_envs={cfg.env.num_envs})")
    missing = [p for p in (cfg.dataset or "").split(",") if p and not Path(p).is_file()]
    if missing and {"imitation", "offline"} & set(cfg.stages):  # said before the run directory holds a report
        raise UserError(f"dataset={cfg.dataset}: no such file {missing[0]} (the .h5 written by `robodistill demos`)")
    check_data_apart(cfg)


def check_data_apart(cfg: RL100Config) -> None:
    """Refuses demonstrations that start from seeds the run rates its policies on, or starts its own training episodes
    from (SEEDS), for the stages it runs: every later stage's policy descends from them. Those of dataset= where a
    stage reads it, and those the init= policy was trained on, where its file records them and they are still on disk."""
    given = cfg.dataset.split(",") if cfg.dataset and {"imitation", "offline"} & set(cfg.stages) else []
    taught = [path for path in trained_data(cfg.init, cfg.env.task) if path.is_file()] if cfg.init else []
    data = episode_seeds([*given, *taught])
    blocks = {"rating": ("rates its policies on", cfg.eval_episodes, STAGES),
              "gate_truth": ("rates the OPE gate's candidates on", cfg.env.num_envs, ("offline",)),
              "collect": ("collects offline rollouts from", SEEDS["collect"][1], ("offline",)),
              "online_eval": ("picks the online policy on", cfg.online.eval_episodes, ("online",)),
              "online": ("trains online from", SEEDS["online"][1], ("online",))}
    for purpose, (what, used, stages) in blocks.items():
        if set(stages) & set(cfg.stages):
            first = env_seed(purpose, cfg.seed)
            check_apart(data, range(first, first + used), f"this run {what}",
                        fix="train on demonstrations planned from other seeds (`robodistill demos` plans from seed=0 on, below every "
                            f"seed rl100 resets with: {HELD_OUT_SEEDS:,} + seed and up)")


class Run:
    """The run directory: stage outputs, the report, and where to resume."""

    def __init__(self, run_dir: Path):
        self.dir = run_dir
        self.path = run_dir / "report.json"
        self.report = json.loads(self.path.read_text()) if self.path.is_file() else {"stages": {}, "decisions": []}

    def done(self, stage: str) -> bool:
        return stage in self.report["stages"] and self.policy_path(stage).is_file()

    def policy_path(self, stage: str) -> Path:
        if stage == "imitation":
            return self.dir / "imitation" / "checkpoints" / "last.pt"
        if stage == "distill":
            return self.dir / "distill" / "checkpoints" / "last.pt"
        return self.dir / stage / "policy.pt"

    def save_report(self) -> None:
        checkpoints.write_json(self.path, self.report)
        checkpoints.write_atomic(self.dir / "report.md", lambda f: f.write(report_markdown(self.report).encode()))
        if self.report["decisions"]:
            plot_ope(self.report["decisions"], self.dir / "ope.png")
        if self.report.get("online_history"):
            plot_online(self.report["online_history"], self.report.get("online_evals", []), self.dir / "online.png")


def load(path: Path, steps: int) -> tuple[dict, DiffusionPolicy]:
    payload = checkpoints.load(path)
    if payload.get("kind") != KIND:
        raise UserError(f"{path} holds a '{payload.get('kind')}', not a Diffusion Policy checkpoint")
    policy = from_checkpoint(payload)
    policy.cfg.sampler, policy.cfg.sampler_steps = "ddim", steps
    policy.set_sampler("ddim", steps)
    policy.consistency = None
    return payload, policy


def save_policy(path: Path, base: dict, policy: DiffusionPolicy, env_cfg: EnvConfig, **extra) -> None:
    """An ordinary diffusion checkpoint (the chain's mean path = its ddim sampler) that records the env
    it was trained in."""
    checkpoints.save(path, {**{k: base[k] for k in ("kind", "train")}, "env": asdict(env_cfg), "policy": policy.spec(),
                            "ema": policy.state_dict(), **extra})


def success(policy: DiffusionPolicy, env, episodes: int, seed: int) -> dict:
    s = evaluate(policy, env, episodes, seed=seed, progress=False).summary
    return {"success_once": s["success_once"]["rate"], "ci95": s["success_once"]["ci95"],
            "success_at_end": s["success_at_end"]["rate"], "episodes": episodes}


def gate_truth(policy: DiffusionPolicy, env, episodes: int, seed: int, gamma: float) -> dict:
    """What the OPE estimators estimate, measured in simulation for the gate's log: success and the
    discounted success (gamma ** the env steps before the one that solves the task) over `episodes` rollouts
    of the training env. The same seeds and sampling noise for every policy (common random numbers),
    so two candidates differ by their policies, not their draws."""
    torch.manual_seed(seed)
    steps = np.array([np.argmax(e.step_success) if e.success else np.inf for e in collect(policy, env, episodes, seed)])
    wins = int(np.isfinite(steps).sum())
    return {"success_once": wins / episodes, "ci95": wilson_interval(wins, episodes), "discounted": float(np.mean(gamma**steps)),
            "episodes": episodes}


@torch.no_grad()
def collect(policy: DiffusionPolicy, env, episodes: int, seed: int) -> list[Episode]:
    """Episodes of `policy` (its current sampler) in a training env (ends at success), with the
    per-step success the critics' reward needs."""
    n = env.num_envs
    obs = env.reset(seed=[seed + i for i in range(n)])
    executor = ChunkExecutor(policy, n)
    executor.observe(obs)
    fresh = lambda state: {"state": [state], "actions": [], "success": []}  # noqa: E731
    current = [fresh(state) for state in obs["state"].cpu().numpy()]
    out: list[Episode] = []
    while len(out) < episodes:
        action = executor.act()
        obs, _, terminated, truncated, info = env.step(action)
        done = (terminated | truncated).cpu()
        # Each step's tensors come to the CPU once, not an env at a time: on physx_cuda every element read of a GPU
        # tensor is a transfer and a wait, three per env and step.
        actions, now, solved = action.cpu().numpy(), obs["state"].cpu().numpy(), info["success"].cpu().numpy()
        last = now
        if done.any():
            ended = done.numpy()
            last, solved = now.copy(), solved.copy()
            last[ended] = info["final_observation"]["state"].cpu().numpy()[ended]
            solved[ended] = info["final_info"]["success"].cpu().numpy()[ended]
        for i in range(n):
            current[i]["actions"].append(actions[i])
            current[i]["state"].append(last[i])
            current[i]["success"].append(bool(solved[i]))
            if done[i]:
                c = current[i]
                out.append(Episode(Path("rollout"), len(out), None, any(c["success"]), np.stack(c["actions"]).astype(np.float32),
                                   {"state": np.stack(c["state"]).astype(np.float32)}, np.array(c["success"])))
                current[i] = fresh(now[i])
        executor.observe(obs, done)
    return out[:episodes]


# ---------------------------------------------------------------------------------------------- stages


def log_scalars(writer, prefix: str, row: dict, step: int, leave_out: tuple[str, ...] = ()) -> None:
    """A report row's numbers (not its intervals, nor the Nones of what was not measured) to TensorBoard at `step`."""
    for key, value in row.items():
        if key not in leave_out and isinstance(value, (int, float)):  # a bool (accepted) is drawn as 0 or 1
            writer.add_scalar(f"{prefix}/{key}", value, step)


def imitation(cfg: RL100Config, run: Run) -> Path:
    from robodistill.training.teacher import TrainTeacherConfig, resumable, train

    out = run.dir / "imitation"
    last = out / "checkpoints" / "last.pt"
    state = resumable(last) if last.is_file() else None  # read once: to see whether it is done, and to go on from
    if state is not None and budget_spent(state["step"], cfg.imitation.iterations, state["train_seconds"], cfg.imitation.minutes):
        return last  # killed while the finished stage was rated: there is nothing left to train
    train(TrainTeacherConfig(
        env=cfg.env, dataset=cfg.dataset, iterations=cfg.imitation.iterations, minutes=cfg.imitation.minutes,
        batch_size=cfg.imitation.batch_size, eval_every=0, eval_episodes=0, threads=cfg.threads, device="cpu",
        seed=cfg.seed, name=cfg.name, resume_from=str(last) if state is not None else None,
    ), out, state)
    return last


def offline_advantage(iql: IQL, state: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
    """The offline PPO step's advantage, shared by every fine-tuned denoising step: A = Q(s, a_0) - V(s), how much
    better the executed action is than V (IQL's upper expectile of Q over the data's actions), normalised over the batch."""
    adv = iql.q(state, action) - iql.value(state)
    return (adv - adv.mean()) / (adv.std() + 1e-8)


def gate_accepts(cand: dict, ref: dict, gate: str, margin: float) -> bool:
    """The OPE gate's verdict: a candidate replaces the reference only if every estimator of GATES[gate] scores it no
    worse than the reference, less `margin`; one that says worse is enough to keep the reference."""
    return all(cand[k] >= ref[k] - margin for k in GATES[gate])


def offline(cfg: RL100Config, run: Run, start: Path, env_cfg: EnvConfig) -> Path:
    o, out = cfg.offline, run.dir / "offline"
    base, actor = load(start, cfg.chain.steps)
    reference = copy.deepcopy(actor)
    make_chain = lambda p: DenoisingChain(p, cfg.chain.steps, cfg.chain.finetune_steps, cfg.chain.std, cfg.chain.noise_clip)  # noqa: E731
    actor_chain, ref_chain = make_chain(actor), make_chain(reference)
    delta = zero_action_holds_still(env_cfg.control_mode)
    demos = load_episodes(cfg.dataset.split(","), control_mode=env_cfg.control_mode, obs_mode="state", task=env_cfg.task)
    try:
        buffer = Transitions.from_episodes(demos, actor_chain, delta, cfg.gamma)
    except ValueError as err:
        raise UserError(str(err)) from err
    s_dim, a_dim = buffer.state.shape[1], buffer.action.shape[1]
    iql = IQL(s_dim, a_dim, o.expectile)
    dynamics = DynamicsEnsemble(s_dim, a_dim, o.ensemble)
    optimizer = torch.optim.Adam(actor.denoiser.parameters(), lr=o.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    iteration, ref_score, ref_true = 0, None, None
    state_path = out / "state.pt"
    if state_path.is_file():
        state = checkpoints.load(state_path)
        if "discount" not in state["buffer"]:  # written before rewards were discounted per env step inside a chunk
            raise UserError(f"{state_path} was written by an older robodistill (its buffer's rewards are not discounted "
                            f"inside a chunk): delete it, and the offline stage starts again from its first iteration")
        actor.load_state_dict(state["actor"])
        reference.load_state_dict(state["reference"])
        iql.load_state_dict(state["iql"])
        dynamics.load_state_dict(state["dynamics"])
        iql.opt.load_state_dict(state["iql_optimizer"])  # the critics are refitted each iteration from where they were
        dynamics.opt.load_state_dict(state["dynamics_optimizer"])
        optimizer.load_state_dict(state["optimizer"])
        buffer = Transitions(**state["buffer"])
        iteration, ref_true = state["iteration"], state["ref_true"]
        gen.set_state(state["gen"])
        checkpoints.set_rng_state(state["rng"])
        print(f"offline: resumed after iteration {iteration}")
    # The report is saved before state.pt (below): its rows past the checkpoint's iteration are made again.
    run.report["decisions"] = [d for d in run.report["decisions"] if d["iteration"] <= iteration]
    if "offline_iterations" in run.report["stages"]:
        run.report["stages"]["offline_iterations"] = [r for r in run.report["stages"]["offline_iterations"] if r["iteration"] <= iteration]
    total_updates = o.iterations * o.updates
    with make_env(replace(env_cfg, reward_mode="sparse")) as train_env:
        if ref_true is None:
            ref_true = gate_truth(reference, train_env, o.gate_eval_episodes, env_seed("gate_truth", cfg.seed), cfg.gamma)
        bar = tqdm(total=o.iterations, initial=iteration, desc="offline", unit="iter")
        writer = tensorboard(out, iteration * o.updates)  # against the offline PPO updates made so far
        while iteration < o.iterations:
            iteration += 1
            # 1. experience from the reference policy's stochastic chain
            reference.sampler = ChainSampler(ref_chain)
            first, draws = collect_seeds(cfg.seed, iteration, train_env.num_envs)
            torch.manual_seed(draws)
            rollouts = collect(reference, train_env, o.collect_episodes, seed=first)
            reference.set_sampler("ddim", cfg.chain.steps)
            buffer = buffer.cat(Transitions.from_episodes(rollouts, ref_chain, delta, cfg.gamma))
            # 2. critics and the model
            losses = {**iql.fit(buffer, o.critic_steps, o.batch_size, gen), **dynamics.fit(buffer, o.dynamics_steps, o.batch_size, gen)}
            starts = buffer.state[buffer.first]

            def score(chain: DenoisingChain, policy_seed: int) -> dict:
                q, disagreement = am_q(chain, iql, dynamics, starts, o.amq_horizon, policy_seed)
                return {"amq": q - o.amq_penalty * disagreement, "amq_q": q, "amq_disagreement": disagreement,
                        "fqe": fqe(chain, buffer, starts, o.fqe_steps, o.batch_size, policy_seed)}

            ref_score = score(ref_chain, cfg.seed)  # the critics changed: rescore the reference
            # 3. PPO over the chain from the reference, gated. A candidate the gate rejected is not
            # trained on: its drift was what a later, refitted critic let through (PushCube: 250
            # updates past the reference, accepted at 80% vs 94%). RL-100 restarts each outer loop
            # from a policy re-fitted to the data, not from a rejected one, for the same reason.
            actor.load_state_dict(reference.state_dict())
            optimizer.state.clear()
            for update in range(1, o.updates + 1):
                done_frac = ((iteration - 1) * o.updates + update - 1) / total_updates
                for g in optimizer.param_groups:
                    g["lr"] = o.lr * (1 - done_frac)
                clip = o.clip * (1 - done_frac)
                b = buffer.batch(o.batch_size, gen)
                with torch.no_grad():
                    cond = actor.encoder({"state": b.state.view(len(b), actor.obs_horizon, -1)})
                    chain, logp_old = ref_chain.sample(cond, gen)
                    adv = offline_advantage(iql, b.state, ref_chain.executed(chain[:, -1]))
                loss, ratio = chain_ppo_loss(actor_chain.log_prob(cond, chain) - logp_old, adv, clip)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(actor.denoiser.parameters(), 1.0)
                optimizer.step()
                if update % o.gate_every == 0 or update == o.updates:
                    cand = score(actor_chain, cfg.seed)
                    accepted = gate_accepts(cand, ref_score, o.gate, o.gate_margin)
                    cand_true = gate_truth(actor, train_env, o.gate_eval_episodes, env_seed("gate_truth", cfg.seed), cfg.gamma)
                    row = {"iteration": iteration, "update": update, "accepted": bool(accepted),
                           **cand, **{f"{k}_reference": v for k, v in ref_score.items()},
                           "true": cand_true["success_once"], "true_ci95": cand_true["ci95"], "true_reference": ref_true["success_once"],
                           "true_discounted": cand_true["discounted"], "true_discounted_reference": ref_true["discounted"],
                           "ratio_clipped": float(((ratio - 1).abs() > clip).float().mean()), "loss": loss.item(), **losses}
                    run.report["decisions"].append(row)
                    log_scalars(writer, "offline/gate", row, (iteration - 1) * o.updates + update, ("iteration", "update"))
                    tqdm.write(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))
                    if accepted:
                        reference.load_state_dict(actor.state_dict())
                        ref_score, ref_true = cand, cand_true
            # 4. the iteration's result: the reference policy, checkpointed with everything to resume. The report first:
            # a kill between the two leaves its rows past the checkpoint, which the resumed run drops (above), where one
            # after state.pt would lose them (the iteration done, its gate decisions in no report).
            run.report["stages"].setdefault("offline_iterations", []).append(
                {"iteration": iteration, "collect_success": float(np.mean([e.success for e in rollouts])),
                 "buffer": len(buffer), **ref_true})
            log_scalars(writer, "offline/iteration", run.report["stages"]["offline_iterations"][-1], iteration * o.updates, ("iteration",))
            run.save_report()
            checkpoints.save(state_path, {
                "actor": actor.state_dict(), "reference": reference.state_dict(), "iql": iql.state_dict(),
                "dynamics": dynamics.state_dict(), "optimizer": optimizer.state_dict(), "buffer": buffer.state_dict(),
                "iql_optimizer": iql.opt.state_dict(), "dynamics_optimizer": dynamics.opt.state_dict(),
                "iteration": iteration, "ref_true": ref_true, "gen": gen.get_state(), "rng": checkpoints.rng_state()})
            bar.update(1)
        bar.close()
        writer.close()
    path = out / "policy.pt"
    save_policy(path, base, reference, env_cfg, rl100={"stage": "offline", "value": iql.v.state_dict()})
    return path


def clip_schedule(last: float, noisiest: float | None, steps: int) -> torch.Tensor:
    """PPO ratio clip per fine-tuned denoising step, noisiest first (DPPO, rate 3): the early steps
    shape the chunk least directly and get the tightest trust region."""
    if noisiest is None or steps == 1:
        return torch.full((steps,), last)
    t = torch.linspace(0, 1, steps)
    return noisiest + (last - noisiest) * (torch.exp(3 * t) - 1) / (np.exp(3) - 1)


def play_chunk(env, actions: torch.Tensor, hist: torch.Tensor, hold: torch.Tensor, gamma: float, value_of
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[bool]]:
    """Executes one chunk (n, h, A) in every env; an env whose episode ends mid-chunk holds still
    (`hold`) until the chunk is over, and its auto-reset state starts the new history.

    Returns the chunk's reward discounted to its first step (gamma ** j for a success at its j-th
    env step; a time-out after it bootstraps gamma ** (j + 1) * value_of(the history it stopped in)),
    which envs' episodes ended, the (n, obs_horizon, S) history to decide from next, and whether
    each episode that ended was solved."""
    n = actions.shape[0]
    reward, ended, outcomes = torch.zeros(n), torch.zeros(n, dtype=torch.bool), []
    for j in range(actions.shape[1]):
        obs, _, terminated, truncated, info = env.step(torch.where(ended[:, None], hold, actions[:, j]))
        step_done = (terminated | truncated).cpu()
        solved = info["success"].cpu().clone()
        if "final_info" in info:
            solved[step_done] = info["final_info"]["success"].cpu()[step_done]
        new = step_done & ~ended
        reward[new & solved] += gamma**j
        cut = new & ~terminated.cpu()
        if cut.any():
            last = torch.cat([hist[:, 1:], info["final_observation"]["state"].cpu().unsqueeze(1)], 1)
            reward[cut] += gamma ** (j + 1) * value_of(last[cut])
        outcomes += [bool(solved[i]) for i in new.nonzero().flatten().tolist()]
        fresh = obs["state"].cpu().unsqueeze(1).repeat(1, hist.shape[1], 1)
        hist = torch.where(step_done[:, None, None], fresh, torch.cat([hist[:, 1:], obs["state"].cpu().unsqueeze(1)], 1))
        ended |= step_done
    return reward, ended, hist, outcomes


def decision_advantages(reward: torch.Tensor, ended: torch.Tensor, value: torch.Tensor, next_value: torch.Tensor, gamma: float,
                        act_horizon: int, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The online stage's GAE over its (D, n) decisions and their value targets. A decision spans act_horizon env steps,
    so the next one's value is worth gamma ** act_horizon; one whose episode ended in its chunk (solved, or timed out,
    whose bootstrap play_chunk has put in its reward) takes nothing from the next decision, the new episode's."""
    return gae(reward, value, next_value, (~ended).float(), gamma**act_horizon, lam)


def chain_ppo_loss(log_ratio: torch.Tensor, adv: torch.Tensor, clip: float | torch.Tensor, denoise_discount: float = 1.0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped surrogate over the denoising chain, offline and online: every fine-tuned step
    (log_ratio's columns, noisiest first) is its own PPO ratio with the env-level advantage `adv`
    (B,) shared, times denoise_discount ** (K' - 1 - j) at step j (DPPO's gamma_denoise: the noisiest
    steps, furthest from the action, move least). Returns the loss and the ratios."""
    ratio = log_ratio.exp()
    k = log_ratio.shape[1]
    a = adv[:, None] * denoise_discount ** torch.arange(k - 1, -1, -1, dtype=adv.dtype)
    return -torch.min(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a).mean(), ratio


def online(cfg: RL100Config, run: Run, start: Path, env_cfg: EnvConfig) -> Path:
    o, out = cfg.online, run.dir / "online"
    base, actor = load(start, cfg.chain.steps)
    chain = DenoisingChain(actor, cfg.chain.steps, cfg.chain.finetune_steps, cfg.chain.std, cfg.chain.noise_clip)
    h, oh = actor.cfg.act_horizon, actor.obs_horizon
    # A (re)start after u updates seeds its envs' first episodes u * envs on; one after the last update still resets them.
    updates = -(-o.env_steps // (o.decisions * o.envs * h))
    check_seeds("online", (updates + 1) * o.envs, f"online.env_steps={o.env_steps} (online.envs={o.envs}, online.decisions={o.decisions})")
    clip = clip_schedule(o.clip, o.clip_noisiest, cfg.chain.finetune_steps)
    norm = actor.normalizers["state"]
    state_of = lambda hist: norm(hist).flatten(1)  # noqa: E731
    s_dim = oh * actor.dims["state_dim"]
    value = mlp(s_dim, 1)
    if "value" in base.get("rl100", {}):  # the offline stage's IQL V: a critic that already knows the task
        value.load_state_dict(base["rl100"]["value"])
    actor_opt = torch.optim.Adam(actor.denoiser.parameters(), lr=o.lr)
    critic_opt = torch.optim.Adam(value.parameters(), lr=o.critic_lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    env_steps, history, evals, best = 0, [], [], None
    state_path = out / "state.pt"
    if state_path.is_file():
        state = checkpoints.load(state_path)
        actor.load_state_dict(state["actor"])
        value.load_state_dict(state["value"])
        actor_opt.load_state_dict(state["actor_opt"])
        critic_opt.load_state_dict(state["critic_opt"])
        env_steps, history, evals, best = state["env_steps"], state["history"], state.get("evals", []), state.get("best")
        gen.set_state(state["gen"])
        print(f"online: resumed at {env_steps} env steps")
    writer = tensorboard(out, env_steps)  # against env steps

    def evaluate_and_keep() -> None:
        """As diffusion_policy's top-k checkpoints and SB3's EvalCallback: the stage returns the best
        evaluated policy (the start included). Its own seeds keep the stage's final evaluation an
        unbiased measure of the kept policy, which selection on a few episodes flatters."""
        nonlocal best
        with make_env(env_cfg, ignore_terminations=True) as eval_env:
            result = success(actor, eval_env, o.eval_episodes, env_seed("online_eval", cfg.seed))
        evals.append({"env_steps": env_steps, "updates": len(history), **result})
        writer.add_scalar("online/eval_success_once", result["success_once"], env_steps)
        if best is None or result["success_once"] > best["success_once"]:  # strictly better, as RL-100's gate
            best = {"env_steps": env_steps, "success_once": result["success_once"], "weights": copy.deepcopy(actor.state_dict())}

    if o.eval_every and not evals:
        evaluate_and_keep()

    @torch.no_grad()
    def value_of(hist: torch.Tensor) -> torch.Tensor:
        return value(state_of(hist)).squeeze(-1)

    hold = torch.zeros(actor.dims["action_dim"])
    if actor.dims["gripper_dims"]:
        hold[actor.dims["gripper_dims"]] = 1.0
    with make_env(replace(env_cfg, reward_mode="sparse", num_envs=o.envs)) as env:
        n = env.num_envs
        obs = env.reset(seed=[env_seed("online", cfg.seed, len(history) * n + i) for i in range(n)])
        hist = obs["state"].cpu().unsqueeze(1).repeat(1, oh, 1)
        bar = tqdm(total=o.env_steps, initial=env_steps, desc="online", unit="step")
        while env_steps < o.env_steps:
            rows = {k: [] for k in ("state", "chain", "logp", "reward", "ended", "value")}
            finished = []
            for _ in range(o.decisions):
                s = state_of(hist)
                with torch.no_grad():
                    x, logp = chain.sample(actor.encoder({"state": s.view(n, oh, -1)}), gen)
                    actions = actor.to_actions(x[:, -1]).cpu()
                    v = value(s).squeeze(-1)
                reward, ended, hist, outcomes = play_chunk(env, actions, hist, hold, cfg.gamma, value_of)
                env_steps += n * h
                finished += outcomes
                for k, val in zip(rows, (s, x, logp, reward, ended, v)):
                    rows[k].append(val)
            batch = {k: torch.stack(v) for k, v in rows.items()}  # (D, n, ...)
            with torch.no_grad():
                next_value = value(state_of(hist)).squeeze(-1)
                adv, returns = decision_advantages(batch["reward"], batch["ended"], batch["value"], next_value, cfg.gamma, h, o.gae_lambda)
            flat = {k: v.flatten(0, 1) for k, v in {**batch, "adv": adv, "returns": returns}.items()}
            total = len(flat["adv"])
            train_actor = len(history) >= o.critic_warmup
            stats = {"approx_kl": [], "clip_frac": []}
            for _ in range(o.epochs):
                for idx in torch.randperm(total, generator=gen).split(o.minibatch):
                    s = flat["state"][idx]
                    a = flat["adv"][idx]
                    a = (a - a.mean()) / (a.std() + 1e-8) if len(idx) > 1 else a
                    pi_loss = torch.zeros(())
                    if train_actor:  # the chain's likelihoods are most of an update's cost: none while V warms up
                        log_ratio = chain.log_prob(actor.encoder({"state": s.view(len(idx), oh, -1)}), flat["chain"][idx]) - flat["logp"][idx]
                        pi_loss, ratio = chain_ppo_loss(log_ratio, a, clip, o.denoise_discount)
                        with torch.no_grad():  # as SB3's PPO logs them: how far each update moved the chain
                            stats["approx_kl"].append(((ratio - 1) - log_ratio).mean().item())
                            stats["clip_frac"].append(((ratio - 1).abs() > clip).float().mean().item())
                    v_loss = F.mse_loss(value(s).squeeze(-1), flat["returns"][idx])
                    if not bool(torch.isfinite(v_loss)):  # else its NaN advantages reach the actor, blamed on online.lr
                        raise diverged("the critic's loss", f"by env step {env_steps}", o.critic_lr, "online.critic_lr")
                    actor_opt.zero_grad(set_to_none=True)
                    critic_opt.zero_grad(set_to_none=True)
                    (pi_loss + 0.5 * v_loss).backward()
                    if train_actor:
                        nn.utils.clip_grad_norm_(actor.denoiser.parameters(), 1.0)
                        actor_opt.step()
                    critic_opt.step()
            with torch.no_grad():  # no rollout has used the last step yet: checked before it is evaluated or saved
                chain.log_prob(actor.encoder({"state": flat["state"][:1].view(1, oh, -1)}), flat["chain"][:1])
            # explained variance of the rollout's values (SB3): near 0 or below, V cannot tell good states from bad and the advantages are noise
            explained = 1 - (flat["returns"] - flat["value"]).var().item() / max(flat["returns"].var().item(), 1e-8)
            row = {"env_steps": env_steps, "episodes": len(finished),
                   "train_success": float(np.mean(finished)) if finished else None, "pi_loss": pi_loss.item(), "v_loss": v_loss.item(),
                   "explained_variance": explained, **{k: float(np.mean(v)) if v else None for k, v in stats.items()}}
            history.append(row)
            log_scalars(writer, "online", row, env_steps, ("env_steps",))
            if o.eval_every and (len(history) % o.eval_every == 0 or env_steps >= o.env_steps):
                evaluate_and_keep()
            bar.update(env_steps - bar.n)
            bar.set_postfix(refresh=False, success=row["train_success"], **({"eval": evals[-1]["success_once"]} if evals else {}))
            checkpoints.save(state_path, {"actor": actor.state_dict(), "value": value.state_dict(), "actor_opt": actor_opt.state_dict(),
                                          "critic_opt": critic_opt.state_dict(), "env_steps": env_steps, "history": history,
                                          "evals": evals, "best": best, "gen": gen.get_state()})
        bar.close()
    writer.close()
    run.report["online_history"] = history
    if best is not None:
        actor.load_state_dict(best["weights"])
        run.report["online_evals"] = evals
        run.report["online_kept"] = {k: best[k] for k in ("env_steps", "success_once")}
        print(f"online: kept the policy at {best['env_steps']} env steps ({best['success_once']:.1%} over {counted(o.eval_episodes, 'episode')})")
    path = out / "policy.pt"
    save_policy(path, base, actor, env_cfg, rl100={"stage": "online", "value": value.state_dict()})
    return path


def distill(cfg: RL100Config, run: Run, start: Path) -> Path:
    from robodistill.training.distill import DistillConfig, train

    out = run.dir / "distill"
    last = out / "checkpoints" / "last.pt"
    if last.is_file():  # as in imitation()
        head = checkpoints.load(last)["consistency"]
        if budget_spent(head["step"], cfg.head.iterations, head["train_seconds"], cfg.head.minutes):
            return last
    train(DistillConfig(teacher=str(start), variant="regression", dataset=cfg.dataset or None, teacher_steps=cfg.chain.steps,
                        iterations=cfg.head.iterations, minutes=cfg.head.minutes, eval_episodes=0, threads=cfg.threads,
                        device="cpu", seed=cfg.seed, name=cfg.name, resume_from=str(last) if last.is_file() else None), out)
    return last


# ---------------------------------------------------------------------------------------------- report


def report_markdown(report: dict) -> str:
    lines = ["| stage | success_once [95% CI] | success_at_end | episodes |", "|---|---|---|---:|"]
    for name, r in report["stages"].items():
        if name == "offline_iterations":
            for it in r:
                lines.append(f"| offline iteration {it['iteration']} (reference; collect success {it['collect_success']:.0%}, "
                             f"buffer {it['buffer']}, discounted success {it['discounted']:.3f}) | {it['success_once']:.1%} "
                             f"[{it['ci95'][0]:.1%}, {it['ci95'][1]:.1%}] | | {it['episodes']} |")
            continue
        label = {"distill": "one-step head (consistency, 1 call)", "init": "init (DDIM)"}.get(name, f"{name} (DDIM)")
        lines.append(f"| {label} | {r['success_once']:.1%} [{r['ci95'][0]:.1%}, {r['ci95'][1]:.1%}] | {r['success_at_end']:.1%} | {r['episodes']} |")
    if "online_kept" in report:
        evals = ", ".join(f"{e['success_once']:.0%}" for e in report["online_evals"])
        lines += ["", f"Online evaluations of the mean path ({report['online_evals'][0]['episodes']} episodes each, every "
                  f"`online.eval_every` updates from the start): {evals}; kept the policy at {report['online_kept']['env_steps']} env steps."]
    dec = report["decisions"]
    if dec:
        lines += ["", "Gate decisions (candidate / reference: the estimates, and in simulation the discounted success they "
                  "estimate and the success rate):", "",
                  "| iteration | update | AM-Q (penalised) | FQE | accepted | true discounted | true success |",
                  "|---:|---:|---|---|---|---|---|"]
        for d in dec:
            lines.append(f"| {d['iteration']} | {d['update']} | {d['amq']:.4f} / {d['amq_reference']:.4f} | {d['fqe']:.4f} / "
                         f"{d['fqe_reference']:.4f} | {'yes' if d['accepted'] else 'no'} | {d['true_discounted']:.3f} / "
                         f"{d['true_discounted_reference']:.3f} | {d['true']:.0%} / {d['true_reference']:.0%} |")
        drops = [d["true_reference"] - d["true"] for d in dec if d["accepted"]]
        lines += ["", f"Accepted {len(drops)} of {len(dec)} candidates; worst true drop of an accepted candidate vs the "
                  f"reference it replaced: {max(drops) * 100 if drops else 0:.0f} points (target: <= 3)."]
    return "\n".join(lines) + "\n"


def plot_ope(decisions: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, title in ((axes[0], "amq_q", "AM-Q (unpenalised)"), (axes[1], "fqe", "FQE")):
        for accepted, color, label in ((True, "tab:green", "accepted"), (False, "tab:red", "rejected")):
            pts = [(d[key], d["true_discounted"]) for d in decisions if d["accepted"] == accepted]
            if pts:
                ax.scatter(*zip(*pts), color=color, label=label, s=20)
        ax.set(xlabel=f"{title} estimate of the candidate", ylabel="true discounted success (simulation)", title=title)
        # candidates' estimates a few 1e-5 apart: the values, not offsets from a note over the axis label, and few
        # enough of those long values along x that they stay apart
        ax.ticklabel_format(useOffset=False)
        ax.locator_params(axis="x", nbins=4)
        ax.legend(loc="lower right")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def plot_online(history: list[dict], evals: list[dict], path: Path) -> None:
    """The online stage per update: success of the exploring rollouts and of the evaluated mean path,
    how well V explains the returns, and how far each update moved the chain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    rollouts = [(r["env_steps"], r["train_success"]) for r in history if r["train_success"] is not None]
    if rollouts:
        axes[0].plot(*zip(*rollouts), ".", color="tab:gray", alpha=0.5, label="exploring rollouts (per update)")
    if evals:
        x = [e["env_steps"] for e in evals]
        y = [e["success_once"] for e in evals]
        err = [[v - e["ci95"][0] for v, e in zip(y, evals)], [e["ci95"][1] - v for v, e in zip(y, evals)]]
        axes[0].errorbar(x, y, yerr=err, fmt="o-", color="tab:blue", capsize=3, label="mean path (95% CI)")
    axes[0].set(xlabel="env steps", ylabel="success", ylim=(-0.02, 1.02), title="success")
    if rollouts or evals:  # else nothing to label (tiny budgets: no episode ended within an update), which matplotlib warns of
        axes[0].legend(loc="lower left", fontsize=8)
    explained = [(r["env_steps"], r["explained_variance"]) for r in history if "explained_variance" in r]  # absent in runs resumed from older versions
    if explained:
        draw_line(axes[1], explained, color="tab:green")
    axes[1].axhline(0, color="k", lw=0.5)
    axes[1].set(xlabel="env steps", title="V's explained variance")
    for key, color in (("approx_kl", "tab:red"), ("clip_frac", "tab:orange")):
        pts = [(r["env_steps"], r[key]) for r in history if r.get(key) is not None]
        if pts:
            draw_line(axes[2], pts, color=color, label=key.replace("_", " "))
            axes[2].legend(loc="upper right", fontsize=8)
    axes[2].set(xlabel="env steps", title="chain movement per update")
    for ax in axes[1:]:
        ax.ticklabel_format(axis="y", useOffset=False)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


# ---------------------------------------------------------------------------------------------- main


def run_stages(cfg: RL100Config, run_dir: Path) -> dict:
    check(cfg)
    set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    policy_path = Path(cfg.init) if cfg.init else None
    run = Run(run_dir)
    check_same_start(cfg.init, run)
    # Loaded only to be rated as the line to beat (a resumed run rated it already), and so checked before the run has a report.
    start = load(policy_path, cfg.chain.steps)[1] if policy_path is not None and "init" not in run.report["stages"] else None
    run_dir.mkdir(parents=True, exist_ok=True)
    env_cfg = cfg.env
    run.report["env"] = asdict(env_cfg)  # recorded now, so that a run killed in its first stage resumes in it
    run.save_report()
    if start is not None and "imitation" not in cfg.stages and "init" not in run.report["stages"]:
        with make_env(env_cfg, ignore_terminations=True) as env:  # the starting point's success: the line to beat
            run.report["stages"]["init"] = {**success(start, env, cfg.eval_episodes, env_seed("rating", cfg.seed)), "policy": str(policy_path)}
        run.save_report()
    for stage in STAGES:
        if run.done(stage):
            policy_path = run.policy_path(stage)
            continue
        if stage not in cfg.stages:
            continue
        if policy_path is None and stage != "imitation":
            raise UserError(f"stage {stage} needs a policy: run imitation first or give init=<checkpoint>")
        tick = time.perf_counter()
        if stage == "imitation":
            policy_path = imitation(cfg, run)
        elif stage in ("offline", "online"):
            try:
                policy_path = (offline if stage == "offline" else online)(cfg, run, policy_path, env_cfg)
            except FloatingPointError as err:  # the chain's outputs (chain.py): its weights may still be finite
                raise diverged("the denoising chain's actions", f"in the {stage} stage", getattr(cfg, stage).lr, f"{stage}.lr") from err
        else:
            policy_path = distill(cfg, run, policy_path)
        if stage == "distill":
            policy = from_checkpoint(checkpoints.load(policy_path))
            policy.set_sampler("consistency", 1)
        else:
            _, policy = load(policy_path, cfg.chain.steps)
        with make_env(env_cfg, ignore_terminations=True) as env:
            result = success(policy, env, cfg.eval_episodes, env_seed("rating", cfg.seed))
        run.report["stages"][stage] = {**result, "policy": str(policy_path), "seconds": round(time.perf_counter() - tick, 1)}
        run.save_report()
        print(f"{stage}: success_once {result['success_once']:.1%} [{result['ci95'][0]:.1%}, {result['ci95'][1]:.1%}] "
              f"over {counted(cfg.eval_episodes, 'episode')} ({policy_path})")
    return run.report


def check_same_start(init: str | None, run: Run) -> None:
    """A resumed run goes on from the policy it started from: another init= would be rated and reported as its start
    while its finished imitation stage replaced it, or be trained on from a report that rates another."""
    started = run.report["stages"].get("init", {}).get("policy") or (str(run.policy_path("imitation")) if run.done("imitation") else None)
    if init is None or started is None or Path(init).resolve() == Path(started).resolve():
        return
    keep = f"init={started}" if "init" in run.report["stages"] else "no init="
    raise UserError(f"init={init}: {run.dir} started from {started}; resume it with {keep}, or start a new run from init={init}")


def check_unfinished_stages(stages: list[str], run: Run) -> None:
    """Resuming a run whose `stages` have all finished would rate nothing and train nothing, and exit as if it had:
    a finished stage is kept as it ran, so a budget raised now (online.env_steps=, ...) would be dropped unsaid."""
    if not all(run.done(stage) for stage in stages):
        return
    trained = [run.policy_path(s) for s in STAGES if s != "distill" and run.done(s)]
    start = f", e.g. stages=[online,distill] init={trained[-1]}" if trained else ""
    raise UserError(f"{run.dir} has already run stages=[{','.join(stages)}]: resuming it has nothing left to do (a finished stage is "
                    f"kept as it ran, whatever its settings now); to train further, start a new run from one of its stages' "
                    f"policies{start}")


def resumed_config(cfg: RL100Config, run: Run, given: set[str]) -> tuple[RL100Config, dict]:
    """`cfg` as the run it resumes (`run`) was started, where `given` leaves a RESUMED setting unset (see resumed_settings),
    and the settings `given` changes. A FROZEN setting, or a finished stage's own, given another value is refused; one a
    resume may change (a budget raised, a stage added) is for the caller to write into the run's .hydra/config.yaml, so
    that resuming it again keeps it."""
    saved = run.dir / ".hydra" / "config.yaml"
    recorded, absent = OmegaConf.load(saved) if saved.is_file() else OmegaConf.create(), object()
    trained = {}
    for key in RESUMED:
        value = OmegaConf.select(recorded, key, default=absent)
        if value is not absent:  # a field newer than the run keeps this command's value
            trained[key] = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    for key in ("dataset", "init"):  # as main records them; a run started before it did may hold them relative
        if trained.get(key):
            trained[key] = absolute_paths(trained[key])
    changed = {k: setting(cfg, k) for k in given if k in trained and setting(cfg, k) != trained[k]}
    cfg = with_fields(cfg, resumed_settings(cfg, trained, RESUMED, given))
    check_unfinished_stages(cfg.stages, run)
    for key, value in changed.items():
        stage = STAGE_OF.get(key.partition(".")[0])
        saved = key in SHAPES_STATE and (run.dir / stage / "state.pt").is_file()
        if key in FROZEN or (stage is not None and run.done(stage)) or saved:
            why = ("which every stage trains or is rated with" if key in FROZEN else f"and its finished {stage} stage is kept as it ran"
                   if run.done(stage) else f"which shapes its unfinished {stage} stage's saved state ({stage}/state.pt)")
            raise UserError(f"{key}={command_line(value)}: {run.dir} runs with {key}={command_line(trained[key])}, {why}; drop {key}= "
                            f"to resume it, or start a new run with {key}={command_line(value)}")
    check_same_start(cfg.init, run)
    return cfg, changed


def main(cfg: DictConfig) -> dict:
    from hydra.core.hydra_config import HydraConfig

    from robodistill.configs import given_fields, record_taken

    container = OmegaConf.to_container(cfg, resolve=True)
    config = RL100Config(
        env=EnvConfig.from_mapping(container.pop("env")), imitation=ImitationConfig(**container.pop("imitation")),
        chain=ChainConfig(**container.pop("chain")), offline=OfflineConfig(**container.pop("offline")),
        online=OnlineConfig(**container.pop("online")), head=HeadConfig(**container.pop("head")), **container)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if config.resume_from:
        run_dir = Path(config.resume_from)
        if not (run_dir / "report.json").is_file() and not (run_dir / "imitation").is_dir():
            raise UserError(f"resume_from={config.resume_from}: not an rl100 run directory (no report.json)")
    elif config.resume:  # the new run directory stays empty, and goes when the command ends
        run_dir = latest_run(config.name, run_dir, "report.json")
    resuming = bool(config.resume or config.resume_from)
    # recorded absolute, so that a resume (which takes them) finds them from any directory
    config = replace(config, dataset=config.dataset and absolute_paths(config.dataset), init=config.init and absolute_paths(config.init))
    record = {"dataset": config.dataset, "init": config.init}
    if resuming:
        config, record = resumed_config(config, Run(run_dir), given_fields())
    recorded = Run(run_dir).report.get("env") if resuming else None  # runs before 2026-12-04 did not record it
    if recorded:
        config.env = take_env(config.env, recorded, given_fields(), ("task", *TRAINED_FIELDS), who="the resumed run")
    elif config.init:  # the starting policy's own env (what it sees, how it acts, its episode limit) unless told otherwise
        config.env = env_for_policy(config.env, config.init, given_fields(),
                                    ("obs_mode", "control_mode", "max_episode_steps", "image_size"), who="the init= policy")
    check(config)  # before the run's config records a value: one refused is not kept for the next resume
    record_taken(record, run_dir)
    report = run_stages(config, run_dir)
    if resuming:  # it went on in the earlier run's directory; the one hydra made for it holds nothing
        from robodistill.cli import drop_empty_run_dir

        drop_empty_run_dir()
    print((run_dir / "report.md").read_text() if (run_dir / "report.md").is_file() else "")
    plots = [f"{what}: {name}" for what, name in (("OPE scatter", "ope.png"), ("online curves", "online.png")) if (run_dir / name).is_file()]
    print(f"report: {run_dir / 'report.md'} ({', '.join(['json: report.json', *plots])})")  # a plot only where its stage ran
    return report
