"""`robodistill bench-latency`: what each sampler of a checkpoint costs per action and what it achieves.

For every sampler, in one process: denoiser calls per inference, latency of one inference call
(`predict_chunk` at batch 1: encoder, sampler, normalisation) as p50/p99, compute per executed
action (p50 / actions executed per inference), and success_once with its 95% interval over
`episodes` episodes (those `robodistill eval` runs with the same seed and sampler). One forward pass
of the denoiser at batch 1 is the floor any sampler pays.
RTI is timed warm (its steady state); the full denoise that starts each episode is in its success,
not in its latency. Writes latency.json and latency.png (success vs latency; none with episodes=0).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from robodistill import checkpoints
from robodistill.curves import save_figure
from robodistill.envs import EnvConfig, make_env
from robodistill.errors import UserError
from robodistill.evaluation import EvalReport, env_for_policy, evaluate, note_unused_rti
from robodistill.inference.samplers import SAMPLERS, RTIConfig
from robodistill.policies import load_policy
from robodistill.policies.base import check_policy_spec

DEFAULT_SAMPLERS = ["ddpm:100", "ddim:10", "rti", "consistency:1", "consistency:3"]


@dataclass
class BenchLatencyConfig:
    """`robodistill bench-latency` (configs/bench-latency.yaml)."""

    env: EnvConfig = field(default_factory=EnvConfig)
    ckpt: str = ""  # a diffusion checkpoint (with a consistency head for the consistency rows)
    samplers: list[str] = field(default_factory=lambda: list(DEFAULT_SAMPLERS))  # name[:steps] (no steps: consistency 1, else the checkpoint's)
    rti: RTIConfig = field(default_factory=RTIConfig)
    calls: int = 200  # timed inference calls per sampler
    episodes: int = 100  # success episodes per sampler; 0: latency only
    seed: int = 0
    threads: int = 1
    name: str = "latency"


def _percentiles(seconds: list[float]) -> tuple[float, float]:
    ms = np.asarray(seconds) * 1e3
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def _timed(fn, calls: int, device: torch.device) -> list[float]:
    # CUDA runs kernels asynchronously: a call on the GPU not waited for is timed as its launch, not its work
    wait = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(5):  # warm-up: allocator, first-call dispatch
        fn()
    wait()
    out = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        wait()
        out.append(time.perf_counter() - start)
    return out


def _parse(spec: str) -> tuple[str, int | None]:
    name, _, steps = spec.partition(":")
    if name not in SAMPLERS or steps and not steps.isdigit():
        raise UserError(f"samplers: '{spec}' is not name[:steps] with name one of {', '.join(SAMPLERS)}, e.g. ddim:10, rti, consistency:1")
    return name, int(steps) if steps else None


def measure(ckpt: str, env_cfg: EnvConfig, samplers: list[str], rti: RTIConfig, calls: int, episodes: int,
            seed: int = 0, label: str = "", measured: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """One row per sampler of `ckpt` (see the module doc); `label` names the checkpoint in the rows
    (default: its run directory); `measured` gets the rows so far after each."""
    rows, parsed = [], [_parse(s) for s in samplers]  # every spec checked before minutes of measuring the first
    with make_env(env_cfg, ignore_terminations=True) as env:
        policy = load_policy(ckpt, env, seed=seed)
        if not hasattr(policy, "set_sampler"):
            raise UserError(f"ckpt={ckpt} is not a diffusion checkpoint; bench-latency compares its samplers")
        if any(name == "consistency" for name, _ in parsed) and policy.consistency is None:
            raise UserError(f"ckpt={ckpt} has no consistency head: distill one (`robodistill distill teacher={ckpt}`) or drop the consistency samplers")
        for name, steps in parsed:  # each sampler's steps checked against this checkpoint before any is measured
            policy.set_sampler(name, steps, rti if name == "rti" else None)
        # Every sampler's episodes draw their noise from here, as `robodistill eval` with this seed would: not from
        # wherever the timed calls and the samplers measured before left torch's RNG (the GPU's too: a policy on
        # env.device=cuda draws there).
        rng = checkpoints.rng_state()
        first = env.reset(seed=[seed] * env.num_envs)
        obs = {k: v[:1].unsqueeze(1).repeat_interleave(policy.obs_horizon, dim=1) for k, v in first.items()}
        cond = policy.condition(obs)
        x = torch.randn(1, policy.cfg.pred_horizon, policy.dims["action_dim"], device=cond.device)
        t = torch.full((1,), policy.cfg.num_train_timesteps - 1, device=cond.device)
        with torch.no_grad():
            floor, _ = _percentiles(_timed(lambda: policy.denoiser(x, t, cond), calls, cond.device))
        for spec, (name, steps) in zip(samplers, parsed):
            policy.set_sampler(name, steps, rti if name == "rti" else None)
            policy.reset(None)
            p50, p99 = _percentiles(_timed(lambda: policy.predict_chunk(obs), calls, cond.device))
            row = {
                "checkpoint": label or _run_name(Path(ckpt).resolve()), "task": env_cfg.task, "sampler": spec,
                "denoiser_calls": policy.sampler.steps, "actions_per_inference": policy.act_horizon,
                "p50_ms": p50, "p99_ms": p99, "ms_per_action": p50 / policy.act_horizon,
                "forward_ms": floor, "p50_over_forward": p50 / floor,
            }
            if episodes:
                checkpoints.set_rng_state(rng)
                report: EvalReport = evaluate(policy, env, episodes, seed=seed)
                s = report.summary["success_once"]
                row.update(success_once=s["rate"], ci95=s["ci95"], episodes=episodes, eval_seconds=report.seconds)
            rows.append(row)
            print(format_rows(rows[-1:], header=len(rows) == 1), flush=True)
            if measured is not None:
                measured(rows)
    return rows


def _run_name(ckpt: Path) -> str:
    """runs/<command>/<run>/checkpoints/last.pt -> <run> (a sweep's job: <time>-multirun/<n>, not <n> alone); a
    checkpoint elsewhere goes by its file name."""
    if ckpt.parent.name != "checkpoints":
        return ckpt.stem
    run = ckpt.parent.parent
    return f"{run.parent.name}/{run.name}" if run.name.isdigit() else run.name


def format_rows(rows: list[dict], header: bool = True) -> str:
    """A markdown table; its checkpoint column as wide as the longest name among `rows` (measure's rows, printed
    one at a time as they come, all name one checkpoint)."""
    lines, name = [], max([10, *(len(r["checkpoint"]) for r in rows)])
    if header:
        lines.append(f"| {'task':<12} | {'checkpoint':<{name}} | {'sampler':<15} | calls | act/inf | p50 ms | p99 ms | ms/action | x forward | success_once [95% CI] |")
        lines.append("|" + "|".join("-" * w for w in (14, name + 2, 17, 7, 9, 8, 8, 11, 11, 23)) + "|")
    for r in rows:
        success = f"{r['success_once']:.0%} [{r['ci95'][0]:.0%}, {r['ci95'][1]:.0%}]" if "success_once" in r else "-"
        lines.append(f"| {r['task']:<12} | {r['checkpoint']:<{name}} | {r['sampler']:<15} | {r['denoiser_calls']:>5} | {r['actions_per_inference']:>7} "
                     f"| {r['p50_ms']:>6.2f} | {r['p99_ms']:>6.2f} | {r['ms_per_action']:>9.3f} | {r['p50_over_forward']:>9.1f} | {success:<21} |")
    return "\n".join(lines)


def figure(rows: list[dict]):
    """Success vs p50 latency (log scale where the samplers' latencies span a decade or more), one marker per
    sampler, one colour per task; None without success rates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rated = [r for r in rows if "success_once" in r]
    if not rated:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = []
    for i, task in enumerate(sorted({r["task"] for r in rated})):
        for r in (r for r in rated if r["task"] == task):
            lo, hi = r["ci95"]
            ax.errorbar(r["p50_ms"], r["success_once"], yerr=[[r["success_once"] - lo], [hi - r["success_once"]]],
                        fmt="o", color=f"C{i}", capsize=3)
            labels.append(ax.annotate(f"{r['sampler']} ({r['checkpoint'][-12:]})" if r["sampler"].startswith("consistency")
                                      else r["sampler"], (r["p50_ms"], r["success_once"]), textcoords="offset points",
                                      xytext=(4, 4), fontsize=7))
        ax.plot([], [], "o", color=f"C{i}", label=task)
    latencies = [r["p50_ms"] for r in rated]
    if max(latencies) >= 10 * min(latencies):  # within a decade a log axis labels its minor ticks, 1.005x10^0,
        ax.set_xscale("log")  # 1.01x10^0, ..., on top of each other
    ax.set_xlabel("latency per inference call, p50 (ms, batch 1, CPU)")
    ax.set_ylabel("success_once (95% Wilson interval)")
    ax.set_ylim(-0.02, 1.05)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _untangle(fig, ax, labels)
    return fig


def _untangle(fig, ax, labels: list) -> None:
    """Samplers of close latency and equal success (every rate 0% or 100%: common) put their labels on top of
    each other: each label, from the fastest sampler on, takes the first line above or below its point that is
    clear of those placed before and inside the axes (else the first clear one), to the left of a point near the
    right edge."""
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    placed = []
    for label in sorted(labels, key=lambda t: t.xy[0]):
        if label.get_window_extent(renderer).x1 > frame.x1:
            label.set_horizontalalignment("right")
        dx = -4 if label.get_horizontalalignment() == "right" else 4
        candidates = []
        for dy in (4, -12, 13, -21, 22, -30, 31, -39, 40, -48):
            label.xyann = (dx, dy)
            box = label.get_window_extent(renderer).padded(2)
            if not any(box.overlaps(other) for other in placed):
                candidates.append(((dx, dy), frame.y0 <= box.y0 and box.y1 <= frame.y1))
        if candidates:
            label.xyann = next((xy for xy, inside in candidates if inside), candidates[0][0])
        placed.append(label.get_window_extent(renderer).padded(2))


def plot(rows: list[dict], path: Path) -> None:
    """`figure(rows)` as a PNG (nothing without success rates)."""
    fig = figure(rows)
    if fig is None:
        return
    save_figure(fig, path, dpi=120)


def main(cfg: DictConfig) -> list[dict]:
    from hydra.core.hydra_config import HydraConfig

    from robodistill.configs import given_fields

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if not cfg.ckpt:
        raise UserError("ckpt= is required: a train-teacher or distill checkpoint")
    if cfg.calls < 1 or cfg.episodes < 0 or cfg.threads < 1:
        raise UserError(f"calls={cfg.calls} and threads={cfg.threads} must be >= 1, episodes={cfg.episodes} >= 0 (0: latency only)")
    if not cfg.samplers:  # nothing to measure: the run would end with nothing written
        raise UserError(f"samplers= is empty: give at least one name[:steps], e.g. samplers=[{','.join(DEFAULT_SAMPLERS)}]")
    check_policy_spec(str(cfg.ckpt), "ckpt")
    note_unused_rti(given_fields(), any(_parse(spec)[0] == "rti" for spec in cfg.samplers), "add rti to samplers=")
    torch.set_num_threads(int(cfg.threads))
    torch.manual_seed(cfg.seed)
    env_cfg = EnvConfig.from_mapping(OmegaConf.to_container(cfg.env, resolve=True))
    env_cfg = env_for_policy(env_cfg, str(cfg.ckpt), given_fields())
    rti = RTIConfig(**OmegaConf.to_container(cfg.rti))
    # latency.json after every sampler: a run stopped (or killed) minutes into the next keeps the rows it measured
    rows = measure(str(cfg.ckpt), env_cfg, list(cfg.samplers), rti, int(cfg.calls), int(cfg.episodes), int(cfg.seed),
                   measured=lambda rows: checkpoints.write_json(run_dir / "latency.json", rows))
    plot(rows, run_dir / "latency.png")  # the table was printed row by row as measured
    if not cfg.episodes:
        print("no latency.png: it plots success against latency, and episodes=0 rates no success")
    print(f"run: {run_dir}")
    return rows
