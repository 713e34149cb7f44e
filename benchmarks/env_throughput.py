"""Env steps per second: raw ManiSkill `env.step` vs the same task through `robodistill.envs.make_env`.

Both run in this process, interleaved (raw, factory, raw, factory, ...) so machine noise hits both
alike; the table shows the median over repeats. The raw loop resets on time-out like the factory's
auto-reset does. A last row per task shows the factory with two worker processes (num_envs=2).

    .venv/bin/python benchmarks/env_throughput.py [--steps 1000] [--repeats 3] [--tasks PushCube-v1 ...]
"""

from __future__ import annotations

import argparse
import statistics
import time

import gymnasium as gym
import mani_skill.envs  # noqa: F401  (registers the tasks for the raw gym.make)
import torch

from robodistill.envs import EnvConfig, make_env
from robodistill.envs.factory import gym_kwargs

from common import check_tasks, counts, guarded


def actions(n: int, dim: int, batch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.rand(n, batch, dim, generator=gen) * 2 - 1


def time_raw(env, acts: torch.Tensor) -> float:
    env.reset(seed=0)
    start = time.perf_counter()
    for a in acts:
        _, _, terminated, truncated, _ = env.step(a)
        if bool(terminated.any() or truncated.any()):
            env.reset()
    return len(acts) / (time.perf_counter() - start)


def time_factory(env, acts: torch.Tensor) -> float:
    env.reset(seed=list(range(env.num_envs)))
    start = time.perf_counter()
    for a in acts:
        env.step(a)
    return len(acts) * env.num_envs / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tasks", nargs="+", default=["PushCube-v1", "PickCube-v1", "PushT-v1"])
    args = parser.parse_args()
    counts(args, "--steps", "--repeats")
    check_tasks("--tasks", args.tasks)
    torch.set_num_threads(1)

    rows = []
    for task in args.tasks:
        cfg = EnvConfig(task=task)
        raw = gym.make(task, **gym_kwargs(cfg, 1, render=False))
        fac = make_env(cfg)
        acts = actions(args.steps, fac.single_action_space.shape[0], 1)
        raw_sps, fac_sps = [], []
        for _ in range(args.repeats):
            raw_sps.append(time_raw(raw, acts))
            fac_sps.append(time_factory(fac, acts))
        raw.close()
        fac.close()
        with make_env(EnvConfig(task=task, num_envs=2)) as two:
            two_sps = [time_factory(two, actions(args.steps, two.single_action_space.shape[0], 2)) for _ in range(args.repeats)]
        r, f, t = (statistics.median(x) for x in (raw_sps, fac_sps, two_sps))
        rows.append((task, r, f, f / r, t, t / r))

    print(f"\nenv steps/s, physx_cpu, state obs, pd_ee_delta_pos, {args.steps} steps x {args.repeats} repeats (median)")
    width = max(map(len, ["task", *args.tasks]))
    header = f"{'task':<{width}} {'raw env.step':>13} {'make_env':>10} {'ratio':>7} {'make_env 2 procs':>17} {'ratio':>7}"
    print(header)
    print("-" * len(header))
    for task, r, f, fr, t, tr in rows:
        print(f"{task:<{width}} {r:>13.0f} {f:>10.0f} {fr:>7.2f} {t:>17.0f} {tr:>7.2f}")


if __name__ == "__main__":
    guarded(main)
