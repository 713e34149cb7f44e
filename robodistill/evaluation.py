"""The one evaluation every command uses: roll a policy out, report rates with Wilson intervals.

Whatever an env reports in `final_info["episode"]` is kept per episode: booleans (success_once,
success_at_end, fail_once, ...) become rates with intervals, numbers (return, episode_len, ...) get
mean and std.

Episodes run in waves of `env.num_envs`; episode k is reset with seed `seed + k`, so its initial state
does not depend on how many envs ran it (nor does a deterministic policy's result; a sampler's noise is
drawn per wave). Every episode runs to the time limit (ignore_terminations), so
both success_once (ever succeeded) and success_at_end (succeeded at the last step) are defined.
Not on physx_cuda with several envs: there ManiSkill lays out a reset's initial states for the whole
batch from its first seed (torch.manual_seed(seeds[0]), then the task's draws for all envs at once;
BaseEnv.reset), so episode k's depends on the wave's size and its place in it, and is not the one the
CPU gives seed + k: the same rate is estimated, on other episodes.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from robodistill import checkpoints
from robodistill.data.trajectories import episode_seeds
from robodistill.envs import EnvConfig, VecEnv, make_env
from robodistill.errors import UserError
from robodistill.inference.chunks import ChunkExecutor
from robodistill.inference.samplers import RTIConfig
from robodistill.policies import Policy, load_policy
from robodistill.policies.base import check_policy_spec, trained_data, trained_env
from robodistill.summary import counted, sampler_words

# What a policy file records of the env it was trained in, and `eval` takes from it unless the command line sets
# env.<field>: the episode limit it learnt to finish in, what it sees and how it acts. The task stays the command
# line's (env=), so that a run is named for what it rates and a mismatch is an error, not a silent switch.
TRAINED_FIELDS = ("obs_mode", "control_mode", "max_episode_steps", "image_size", "reward_mode", "scene", "collision_penalty")

# Evaluations inside training runs start at seed HELD_OUT_SEEDS + the run's seed: past the seeds `robodistill demos`
# plans from (0 on), so they rate initial states the demonstrations did not show.
HELD_OUT_SEEDS = 10_000


def rated_seeds(seed: int, episodes: int) -> range:
    """The reset seeds of a training run's evaluations: HELD_OUT_SEEDS + its seed + k for episode k."""
    return range(HELD_OUT_SEEDS + seed, HELD_OUT_SEEDS + seed + episodes)


def check_apart(datasets: dict[Path, list[int]], seeds: range, what: str = "this run's evaluations rate", fix: str | None = None) -> None:
    """Refuses to train on a dataset (file -> the reset seeds its episodes start from) whose episodes start from
    `seeds`, which the run resets episodes with for `what`: an evaluation there rates the initial states the policy
    imitated, and reports a success the held-out states would not give, without a word. `fix` defaults to a trainer's
    (a seed= whose evaluations clear the dataset's seeds)."""
    for path, dataset_seeds in datasets.items():
        met = sorted(s for s in set(dataset_seeds) if s in seeds)
        if met:
            shown = ", ".join(map(str, met[:5])) + (", ..." if len(met) > 5 else "")
            fix = fix or (f"set seed={max(dataset_seeds) + 1 - HELD_OUT_SEEDS} or more (evaluations start at {HELD_OUT_SEEDS:,} + seed), "
                          "or train on demonstrations planned from other seeds (`robodistill demos` plans from seed=0 on)")
            raise UserError(f"dataset {path}: {len(met)} of its episodes start from seeds that {what} ({seeds.start} to "
                            f"{seeds.stop - 1}): {shown}; it would rate the initial states the policy learnt from: {fix}")


UNITS = {"path_length": "m", "time_to_goal": "s"}  # of the metrics an env records per episode (the AGV's)


@dataclass
class EvalConfig:
    """`robodistill eval` (configs/eval.yaml)."""

    env: EnvConfig = field(default_factory=EnvConfig)
    policy: str = "random"  # random, scripted (PushCube-v1 expert), or the path of a policy checkpoint
    sampler: str | None = None  # diffusion checkpoints: ddpm, ddim, rti or consistency (default: the checkpoint's)
    steps: int | None = None  # denoiser calls per chunk for `sampler` (default: consistency 1, else the checkpoint's; rti: see `rti.timesteps`)
    rti: RTIConfig = field(default_factory=RTIConfig)  # the rti sampler's settings
    episodes: int = 10
    seed: int = 0  # episode k is reset with seed + k (demos plan from 0 on: HELD_OUT_SEEDS rates held-out states)
    video: bool = False  # mp4s of the first video_episodes episodes in <run>/videos/
    video_episodes: int = 2
    name: str = "eval"  # run directory suffix


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial rate (sound at 0/n and n/n, unlike the normal one)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z**2 / n
    centre = (p + z**2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denom
    # At 0/n and n/n the bound equals the rate only up to float rounding (1 - 1.1e-16 at 100/100); error bars
    # drawn from it must not come out negative, which matplotlib refuses.
    return (min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half)))


@dataclass
class EvalReport:
    episodes: list[dict]
    seconds: float
    env_steps: int
    summary: dict = field(init=False)

    def __post_init__(self) -> None:
        """Boolean episode metrics become rates with Wilson intervals; numbers get mean and std."""
        n = len(self.episodes)
        summary: dict = {"episodes": n}
        keys = [k for k in (self.episodes[0] if n else {}) if k not in ("episode", "seed")]
        for key in keys:
            values = [e[key] for e in self.episodes]
            if isinstance(values[0], bool):
                k = sum(values)
                summary[key] = {"rate": k / n, "count": k, "ci95": list(wilson_interval(k, n))}
            else:
                arr = np.asarray(values, dtype=np.float64)
                summary[f"mean_{key}"], summary[f"std_{key}"] = float(arr.mean()), float(arr.std())
        summary["seconds"] = self.seconds
        summary["env_steps_per_second"] = self.env_steps / self.seconds if self.seconds > 0 else float("nan")
        self.summary = summary

    def table(self, title: str = "") -> str:
        s = self.summary
        lines = [title] if title else []
        lines.append(f"{'metric':<16} {'value':>8}   95% interval")
        for key, r in s.items():
            if isinstance(r, dict):
                lines.append(f"{key:<16} {r['rate']:>8.1%}   [{r['ci95'][0]:.1%}, {r['ci95'][1]:.1%}]   ({r['count']}/{s['episodes']})")
        for key in (k[len("mean_"):] for k in s if k.startswith("mean_")):
            label = key.replace("_", " ") + (f" ({UNITS[key]})" if key in UNITS else "")
            lines.append(f"{label:<16} {s['mean_' + key]:>8.3f}   (std {s['std_' + key]:.3f})")
        lines.append(f"{'wall time':<16} {s['seconds']:>7.1f}s   ({s['env_steps_per_second']:.0f} env steps/s)")
        return "\n".join(lines)

    def save(self, path: str | Path, **extra) -> Path:
        # Atomic: a full disk ends the run in one line and leaves no cut-short file that `summary` fails to parse.
        return checkpoints.write_json(path, {**extra, "summary": self.summary, "episodes": self.episodes})


def _write_video(frames: list[np.ndarray], path: Path, fps: int) -> None:
    import imageio.v2 as imageio

    path.parent.mkdir(parents=True, exist_ok=True)
    imageio.mimwrite(path, frames, fps=fps, macro_block_size=1)


def episode_metrics(info: dict, i: int) -> dict:
    """What the env recorded about env i's finished episode (success_once, return, ...)."""
    ep = info["final_info"]["episode"]
    return {k: ep[k][i].item() for k in ep if not k.startswith("_") and k != "reward"}


def evaluate(
    policy: Policy,
    env: VecEnv,
    episodes: int,
    seed: int = 0,
    video_dir: str | Path | None = None,
    video_episodes: int = 2,
    progress: bool = True,
) -> EvalReport:
    """Run `episodes` episodes of `policy` in `env` (made with ignore_terminations=True).

    :param video_dir: if given (and env made with render=True), mp4s of the first
        `video_episodes` episodes are written there: an episode of T steps gives T + 1 frames, its reset state
        and the state after each step, its last (solved or not) included.
    """
    rows: list[dict] = []
    n_envs = env.num_envs
    record = video_dir is not None and video_episodes > 0
    steps = 0
    start = time.perf_counter()
    bar = tqdm(total=episodes, desc="eval", unit="ep", disable=not progress)
    # Periodic evaluations must not change what is trained: the simulator's auto-resets and the policies'
    # sampling draw from torch's global RNG, so it is left as it was found.
    with torch.random.fork_rng():
        for wave_start in range(0, episodes, n_envs):
            seeds = [seed + wave_start + i for i in range(n_envs)]
            # Rebuilt once per call: a periodic evaluation (or one after resuming) rates as in a fresh env.
            obs = env.reset(seed=seeds, rebuild=wave_start == 0)
            executor = ChunkExecutor(policy, n_envs)
            executor.observe(obs)
            finished: dict[int, dict] = {}
            film = min(n_envs, video_episodes - wave_start, episodes - wave_start) if record else 0
            # The reset state, then the state each step reaches: rendered inside the step, so an episode's last state
            # is filmed before the auto-reset replaces it (T + 1 frames for T steps).
            frames: list[np.ndarray] = [env.render()[:film]] if film > 0 else []
            filmed: dict[int, int] = {}  # env -> frames of its episode: an env that ends early steps on into others
            while len(finished) < n_envs:
                action = executor.act()
                bad = ~torch.isfinite(action).flatten(1).all(1)
                if bad.any():  # else ManiSkill's "Action cannot be NaN" traceback (the AGV env's own)
                    rated = [i for i in bad.nonzero().flatten().tolist() if i not in finished]
                    if rated:
                        raise UserError(f"the policy's actions are not finite (NaN or inf) in the episode with seed {seeds[rated[0]]}: "
                                        "its weights or normalisers are not, as a training run that diverged leaves them")
                    # Envs whose episode ended early (the AGV's) step on, unrated and unseeded, until the wave ends: an
                    # action there was blamed on the episode they had finished; they are held still instead.
                    action = torch.where(bad.view(-1, *[1] * (action.dim() - 1)), torch.zeros_like(action), action)
                obs, _, terminated, truncated, info = env.step(action, render=film > 0)
                steps += n_envs
                if film > 0:
                    frames.append(info["frames"][:film])
                done = (terminated | truncated).cpu()
                for i in done.nonzero().flatten().tolist():
                    if i not in finished:
                        finished[i] = episode_metrics(info, i)
                        filmed[i] = len(frames)
                executor.observe(obs, done)
            for i in range(min(n_envs, episodes - wave_start)):
                rows.append({"episode": wave_start + i, "seed": seeds[i], **finished[i]})
            bar.update(min(n_envs, episodes - wave_start))
            if film > 0:
                for i, clip in enumerate(np.stack(frames, axis=1)):  # (film, T, H, W, 3)
                    _write_video(list(clip[:filmed[i]]), Path(video_dir) / f"episode_{wave_start + i:03d}.mp4", env.control_freq)
    bar.close()
    return EvalReport(rows, time.perf_counter() - start, steps)


def configure_sampler(policy: Policy, sampler: str | None, steps: int | None, rti: RTIConfig) -> None:
    """Apply `sampler=`/`steps=` (and `rti.*`) to a diffusion policy; other policies have none."""
    if sampler is None and steps is None:
        return
    if not hasattr(policy, "set_sampler"):
        raise UserError("sampler/steps apply to diffusion checkpoints, not to this policy")
    policy.set_sampler(sampler or policy.sampler.name, steps, rti)


def note_unused_rti(given: set[str], uses_rti: bool, use: str = "add sampler=rti") -> None:
    """Says so when the command line (`given`) sets `rti.*` for a run that samples no `rti`, and how to `use` them: they
    would be ignored without a word. A note, not an error: a sweep over samplers (-m sampler=ddim,rti) sets them for all."""
    rti = sorted(k for k in given if k == "rti" or k.startswith("rti."))
    if rti and not uses_rti:
        print(f"{', '.join(rti)}: not used, this run samples no rti ({use})")


def env_for_policy(env_cfg: EnvConfig, spec: str, given: set[str] = frozenset(), fields: tuple[str, ...] = TRAINED_FIELDS,
                   who: str = "the policy") -> EnvConfig:
    """`env_cfg` with the `fields` the policy file `spec` records and the command line (`given`, as
    `env.<field>`) leaves unset; says which it took, naming the policy as `who`. Unchanged when the policy trained on another
    task: its loader names the mismatch."""
    return take_env(env_cfg, trained_env(spec), given, fields, who)


def take_env(env_cfg: EnvConfig, recorded: dict, given: set[str], fields: tuple[str, ...] = TRAINED_FIELDS,
             who: str = "the policy") -> EnvConfig:
    """`env_cfg` with the `fields` of a `recorded` env (EnvConfig fields; a VLA's adds its `tasks`) that
    the command line (`given`) leaves unset, printed and recorded in the run's config; unchanged when `recorded`
    is of another task (that of `env_cfg`, or the recorded one where `fields` holds "task" and `given` no task)."""
    from robodistill.configs import record_taken

    given = (given | {"env.task"}) if "env" in given else given  # env=<task> sets the task
    taken = {k: recorded[k] for k in fields if k in recorded and f"env.{k}" not in given and recorded[k] != getattr(env_cfg, k)}
    if taken.get("task", env_cfg.task) not in recorded.get("tasks", [recorded.get("task")]):
        return env_cfg
    if taken and os.environ.get("RANK", "0") == "0":  # under torchrun every rank takes it; one says so
        print(f"as {who} was trained: {' '.join(f'env.{k}={v}' for k, v in taken.items())} (set env.<field>= to change)")
    record_taken({f"env.{k}": v for k, v in taken.items()})
    return replace(env_cfg, **taken)


def note_training_states(policy: str, task: str, seeds: range) -> None:
    """Says how many of the rated episodes (reset `seeds`) start from initial states the policy learnt from, where its
    file records its demonstrations and they are still on disk: a note, not an error, for a user may mean to rate them."""
    data: dict[Path, list[int]] = {}
    for path in trained_data(policy, task):
        try:
            data.update(episode_seeds([path]))
        except UserError:  # moved or replaced since: nothing to say about it, and the rating stands
            continue
    meeting = {path: set(learnt) & set(seeds) for path, learnt in data.items()}
    met = set().union(*meeting.values())
    if met:
        where = ", ".join(str(path) for path, common in meeting.items() if common)
        print(f"note: {len(met)} of these {counted(len(seeds), 'episode')} start from initial states in the policy's training data "
              f"({where}): use seed={max(s for learnt in data.values() for s in learnt) + 1} or more to rate held-out states")


def check_seed(seed: int) -> None:
    if seed < 0:  # numpy's generators, and so the env's reset, refuse it with a traceback
        raise UserError(f"seed must be >= 0 (episode k is reset with seed + k), got {seed}")


def main(cfg: DictConfig) -> EvalReport:
    from hydra.core.hydra_config import HydraConfig

    from robodistill.configs import given_fields

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if cfg.episodes < 1:
        raise UserError(f"episodes must be >= 1, got {cfg.episodes}")
    if cfg.video and cfg.video_episodes < 1:  # else a run asked for videos that films none
        raise UserError(f"video_episodes={cfg.video_episodes} must be >= 1 with video=true (the first episodes are filmed)")
    check_seed(cfg.seed)
    check_policy_spec(str(cfg.policy))
    note_unused_rti(given_fields(), cfg.sampler == "rti")
    torch.manual_seed(cfg.seed)
    env_cfg = EnvConfig.from_mapping(OmegaConf.to_container(cfg.env, resolve=True))
    env_cfg = env_for_policy(env_cfg, str(cfg.policy), given_fields())
    with make_env(env_cfg, render=bool(cfg.video), ignore_terminations=True) as env:
        policy = load_policy(str(cfg.policy), env, seed=cfg.seed)
        configure_sampler(policy, cfg.sampler, cfg.steps, RTIConfig(**OmegaConf.to_container(cfg.rti)))
        report = evaluate(
            policy, env, int(cfg.episodes), seed=int(cfg.seed),
            video_dir=run_dir / "videos" if cfg.video else None, video_episodes=int(cfg.video_episodes),
        )
        # what a diffusion policy sampled with, its checkpoint's default included: one checkpoint is rated per sampler
        used = {"name": policy.sampler.name, "steps": policy.sampler.steps} if hasattr(policy, "set_sampler") else None
        if used and used["name"] == "rti":
            used["timesteps"] = list(policy.sampler.timesteps)
    report.save(run_dir / "eval.json", env=env_cfg.__dict__, policy=str(cfg.policy), seed=int(cfg.seed), sampler=used)
    with_sampler = f", sampler {sampler_words(used['name'], used['steps'], used.get('timesteps'))}" if used else ""
    print(report.table(f"{cfg.policy}{with_sampler} on {env_cfg.task} ({counted(report.summary['episodes'], 'episode')}, seed {cfg.seed})"))
    note_training_states(str(cfg.policy), env_cfg.task, range(cfg.seed, cfg.seed + int(cfg.episodes)))
    print(f"run: {run_dir}")
    return report
