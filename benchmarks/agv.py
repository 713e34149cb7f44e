"""AGV warehouse: env steps per second, and PPO vs PPO + RND on the four scenes at one budget.

1. Env throughput on this one core: random actions through the `VecEnv` adapter, auto-resets
   (procedural layouts) included, for 16 robots stepped together and for a single robot.
2. For every scene, algo and seed: `train` with the same env-step budget, then the shared
   `evaluate` of the saved policy.pt (loaded as `robodistill eval` would) on held-out seeds.
   Success is pooled over seeds with a 95% Wilson interval; path length and time to goal are means
   over the successful episodes. The PNG shows the periodic evaluations during training.
   A run whose directory already holds policy.pt and history.json is reused, so the grid can be
   split over cores (one process per `--scenes`, same `--out`) and summarized by a last call; one
   made with another --budget, --curve-episodes, --curve-points or --collision-penalty stops it.

    taskset -c 1 .venv/bin/python benchmarks/agv.py [--budget 1048576] [--seeds 0 1 2] [--out runs/bench-agv]

Sizing: one core trains ~4,000 env steps/s (PPO) to ~3,000 (PPO+RND, complex_dynamic), so the
default grid (4 scenes x 2 algos x 3 seeds at 1,048,576 steps) takes about 1.5 h on one core.

Issue 9 targets, checked at the end: PPO+RND's success >= PPO's + 30 points on the sparse complex
scenes and no worse on all four; >= 5,000 env steps/s per core with 16 robots.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from robodistill.envs import EnvConfig, make_env
from robodistill.envs.agv import SCENES, TASK
from robodistill.evaluation import evaluate, wilson_interval
from robodistill.policies import load_policy
from robodistill.training.ppo_rnd import AGVTrainConfig, train

from common import absolute, at_least, counts, distinct, guarded, same_settings

ALGOS = ("ppo", "ppo_rnd")
NAMES = {"ppo": "PPO", "ppo_rnd": "PPO+RND"}
TARGET_SPS, TARGET_GAIN = 5000, 0.30


def env_cfg(scene: str, num_envs: int) -> EnvConfig:
    return EnvConfig(task=TASK, scene=scene, num_envs=num_envs, control_mode=None)


def throughput(scene: str, num_envs: int, env_steps: int) -> float:
    env = make_env(env_cfg(scene, num_envs))
    env.reset(seed=0)
    gen = torch.Generator().manual_seed(0)
    n = max(1, env_steps // num_envs)
    actions = torch.rand(n, num_envs, 2, generator=gen) * 2 - 1
    start = time.perf_counter()
    for a in actions:
        env.step(a)
    return n * num_envs / (time.perf_counter() - start)


def final_eval(policy_path: Path, scene: str, episodes: int, seed: int) -> list[dict]:
    with make_env(env_cfg(scene, 16)) as env:
        policy = load_policy(str(policy_path), env)
        return evaluate(policy, env, episodes, seed=seed, progress=False).episodes


def summarize(episodes: list[dict]) -> dict:
    n, wins = len(episodes), [e for e in episodes if e["success_once"]]
    k = len(wins)
    return {
        "episodes": n, "success": k / n, "ci95": wilson_interval(k, n),
        "collision": sum(e["collision"] for e in episodes) / n,
        "path_length": float(np.mean([e["path_length"] for e in wins])) if wins else float("nan"),
        "time_to_goal": float(np.mean([e["time_to_goal"] for e in wins])) if wins else float("nan"),
    }


def plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenes = list(curves)
    fig, axes = plt.subplots(1, len(scenes), figsize=(4.2 * len(scenes), 3.6), squeeze=False)
    for ax, scene in zip(axes[0], scenes):
        for algo, runs in curves[scene].items():
            # Each run's evaluations at their own steps, where every seed has one: no run's x axis stands for the others'.
            by_step = [{h["step"]: h["success"] for h in run} for run in runs]
            steps = sorted(set.intersection(*map(set, by_step)))
            success = np.array([[run[s] for s in steps] for run in by_step])
            line, = ax.plot(steps, success.mean(0), label=f"{algo} (mean of {len(runs)} seeds)")
            ax.fill_between(steps, success.min(0), success.max(0), color=line.get_color(), alpha=0.2)
        ax.set_title(scene)
        ax.set_xlabel("env steps")
        ax.set_ylim(-0.02, 1.02)
    axes[0][0].set_ylabel("eval success rate")
    axes[0][-1].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=1_048_576, help="env steps per training run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--scenes", nargs="+", default=list(SCENES), choices=list(SCENES))
    parser.add_argument("--algos", nargs="+", default=list(ALGOS), choices=list(ALGOS), help="trained in this order")
    parser.add_argument("--eval-episodes", type=int, default=48, help="final evaluation episodes per run")
    parser.add_argument("--curve-episodes", type=int, default=16, help="episodes per periodic evaluation during training")
    parser.add_argument("--curve-points", type=int, default=32, help="periodic evaluations per training run")
    parser.add_argument("--throughput-steps", type=int, default=16_000)
    parser.add_argument("--collision-penalty", type=float, default=None, help="env.collision_penalty for training (default: 1)")
    parser.add_argument("--out", type=absolute, default="runs/bench-agv")
    args = parser.parse_args()
    at_least("--budget", args.budget, AGVTrainConfig.num_envs * AGVTrainConfig.num_steps)  # one PPO update
    for flag in ("--seeds", "--scenes", "--algos"):
        distinct(flag, getattr(args, flag[2:]))
    counts(args, "--eval-episodes", "--curve-episodes", "--curve-points", "--throughput-steps")
    if args.collision_penalty is not None:
        at_least("--collision-penalty", args.collision_penalty, 0)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    run_dirs = {(scene, algo, seed): args.out / scene / algo / f"seed{seed}" for scene in args.scenes for algo in args.algos for seed in args.seeds}
    settings = {"--budget": args.budget, "--curve-episodes": args.curve_episodes, "--curve-points": args.curve_points,
                "--collision-penalty": args.collision_penalty}
    for run_dir in run_dirs.values():
        same_settings(run_dir, settings, made=(run_dir / "policy.pt").is_file() or (run_dir / "checkpoints" / "last.pt").is_file())
    began = time.perf_counter()

    print("env steps/s on one core (random actions, auto-resets included)")
    print(f"{'scene':<16} {'16 robots':>10} {'1 robot':>10}")
    sps = {}
    for scene in args.scenes:
        sps[scene] = {b: throughput(scene, b, args.throughput_steps if b > 1 else args.throughput_steps // 4) for b in (16, 1)}
        print(f"{scene:<16} {sps[scene][16]:>10.0f} {sps[scene][1]:>10.0f}", flush=True)

    results, curves = {}, {}
    for scene in args.scenes:
        for algo in args.algos:
            episodes, runs, per_seed = [], [], []
            for seed in args.seeds:
                t0 = time.perf_counter()
                cfg = AGVTrainConfig(scene=scene, algo=algo, seed=seed, total_steps=args.budget, progress=False,
                                     eval_episodes=args.curve_episodes, name=f"{algo}-{scene}-{seed}",
                                     collision_penalty=args.collision_penalty)
                cfg.eval_every = max(1, args.budget // (cfg.num_envs * cfg.num_steps * args.curve_points))
                run_dir = run_dirs[scene, algo, seed]
                if (run_dir / "policy.pt").is_file() and (run_dir / "history.json").is_file():  # finished earlier
                    print(f"  reusing {run_dir}", flush=True)
                    history = json.loads((run_dir / "history.json").read_text())
                    out = {"history": history, "policy": run_dir / "policy.pt", "step": history[-1]["step"]}
                else:  # a run killed part way continues from its last checkpoint
                    cfg.resume_from = str(run_dir) if (run_dir / "checkpoints" / "last.pt").is_file() else None
                    out = train(cfg, run_dir)
                runs.append(out["history"])
                run_eps = final_eval(out["policy"], scene, args.eval_episodes, seed=2_000_000 + 1000 * seed)
                episodes += run_eps
                rate = sum(e["success_once"] for e in run_eps) / len(run_eps)
                per_seed.append(rate)
                print(f"  {scene} {algo} seed {seed}: {out['step']} steps, success {rate:.1%}, {time.perf_counter() - t0:.0f}s", flush=True)
            results.setdefault(scene, {})[algo] = {**summarize(episodes), "per_seed": per_seed}
            curves.setdefault(scene, {})[algo] = runs

    penalty = "" if args.collision_penalty is None else f", collision penalty {args.collision_penalty:g}"
    print(f"\n{' vs '.join(NAMES[algo] for algo in args.algos)}, {args.budget} env steps per run{penalty}, seeds {args.seeds}, {args.eval_episodes} eval episodes per seed")
    print(f"{'scene':<16} {'algo':<8} {'success':>8}  {'95% interval':<15} {'per seed':<18} {'collision':>9} {'path m':>7} {'goal s':>7}")
    for scene, by_algo in results.items():
        for algo, r in by_algo.items():
            seeds = " ".join(f"{s:.2f}" for s in r["per_seed"])
            print(f"{scene:<16} {algo:<8} {r['success']:>8.1%}  [{r['ci95'][0]:.1%}, {r['ci95'][1]:.1%}]{'':<2} {seeds:<18} "
                  f"{r['collision']:>9.1%} {r['path_length']:>7.2f} {r['time_to_goal']:>7.1f}")
    print("(path m and goal s: means over successful episodes)")

    print("\ntargets (issue 9)")
    for scene in args.scenes if set(args.algos) == set(ALGOS) else ():
        gain = results[scene]["ppo_rnd"]["success"] - results[scene]["ppo"]["success"]
        need = TARGET_GAIN if scene.startswith("complex") else 0.0
        print(f"  {scene:<16} PPO+RND - PPO = {gain:+.1%} (target >= {need:+.0%}): {'met' if gain >= need else 'MISSED'}")
    for scene in args.scenes:
        print(f"  {scene:<16} {sps[scene][16]:.0f} env steps/s with 16 robots (target >= {TARGET_SPS}): {'met' if sps[scene][16] >= TARGET_SPS else 'MISSED'}")

    png = args.out / "agv_success_vs_steps.png"
    plot(curves, png)
    (args.out / "results.json").write_text(json.dumps({"budget": args.budget, "seeds": args.seeds, "steps_per_second": sps,
                                                       "results": results, "curves": curves}, indent=2))
    print(f"\nplot: {png}\nresults: {args.out / 'results.json'}\ntotal {time.perf_counter() - began:.0f}s")


if __name__ == "__main__":
    guarded(main)
