"""Fast control, side by side in one process: DDPM-100, DDIM-10, RTI and the consistency heads.

For each task, the first checkpoint (a `robodistill distill` output: teacher + head) gives the rows
of the teacher's samplers (ddpm:100, ddim:10, rti) and its head's (consistency:1, consistency:3);
every further checkpoint of the task adds its own head's rows (another distillation variant, same
teacher). `--rti-scaled TASK=CKPT` adds RTI on a teacher trained with `policy.gripper_scale=10`
(the paper's scale variant) next to its own DDPM-100. Columns: see robodistill.inference.latency.

    python benchmarks/latency.py \
        --task PushCube-v1=runs/distill/<regression>/checkpoints/last.pt,runs/distill/<consistency>/checkpoints/last.pt \
        --task PickCube-v1=... --rti-scaled PickCube-v1=runs/train-teacher/<scaled>/checkpoints/last.pt --episodes 100

Prints one table (markdown) and writes latency.json and latency.png to --out.
"""

from __future__ import annotations

import argparse
import json

import torch

from robodistill import checkpoints
from robodistill.envs import EnvConfig
from robodistill.errors import UserError
from robodistill.inference.latency import format_rows, measure, plot
from robodistill.inference.samplers import RTIConfig

from common import absolute, check_tasks, counts, guarded

TEACHER_SAMPLERS = ["ddpm:100", "ddim:10", "rti"]
HEAD_SAMPLERS = ["consistency:1", "consistency:3"]


def _pairs(values: list[str], flag: str) -> list[tuple[str, list[str]]]:
    out = []
    for value in values:
        task, _, paths = value.partition("=")
        if not paths:
            raise UserError(f"{flag} {value}: expected TASK=CKPT[,CKPT...]")
        out.append((task, paths.split(",")))
    return out


def _load(flag: str, task: str, path: str) -> dict:
    try:
        return checkpoints.load(path)
    except UserError as err:
        raise UserError(f"{flag} {task}={path}: {err}") from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", action="append", default=[], help="TASK=CKPT[,CKPT...] (distill outputs of one teacher)")
    ap.add_argument("--rti-scaled", action="append", default=[], help="TASK=CKPT of a teacher trained with policy.gripper_scale")
    ap.add_argument("--rti-timesteps", default="3,1,0")
    ap.add_argument("--episodes", type=int, default=100)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--max-episode-steps", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=absolute, default="runs/benchmarks/latency")
    args = ap.parse_args()
    if not args.task:
        ap.error("give at least one --task TASK=CKPT")
    counts(args, "--episodes", "--calls", "--max-episode-steps")
    for flag, values in (("--task", args.task), ("--rti-scaled", args.rti_scaled)):
        check_tasks(flag, [task for task, _ in _pairs(values, flag)])
    for task, paths in _pairs(args.task, "--task"):
        for path in paths:
            if _load("--task", task, path).get("consistency") is None:
                raise UserError(f"--task {task}={path} has no consistency head: give `robodistill distill` outputs "
                                f"(runs/distill/<run>/checkpoints/last.pt); a teacher trained with gripper_scale goes to --rti-scaled")
    for task, (path, *_) in _pairs(args.rti_scaled, "--rti-scaled"):
        _load("--rti-scaled", task, path)
    torch.set_num_threads(1)
    rti = RTIConfig(timesteps=[int(t) for t in args.rti_timesteps.split(",")])

    rows = []
    for task, paths in _pairs(args.task, "--task"):
        env = EnvConfig(task=task, max_episode_steps=args.max_episode_steps)
        for i, path in enumerate(paths):
            label = checkpoints.load(path)["consistency"]["config"]["variant"]
            samplers = (TEACHER_SAMPLERS if i == 0 else []) + HEAD_SAMPLERS
            for row in measure(path, env, samplers, rti, args.calls, args.episodes, args.seed, label=label):
                rows.append({**row, "checkpoint": label if row["sampler"].startswith("consistency") else "teacher"})
            if i == 0:  # the paper's setting: re-plan after every action
                one = RTIConfig(timesteps=rti.timesteps, actions_per_inference=1)
                rows += [{**row, "checkpoint": "teacher", "sampler": "rti (1 action)"}
                         for row in measure(path, env, ["rti"], one, args.calls, args.episodes, args.seed)]
    for task, (path, *_) in _pairs(args.rti_scaled, "--rti-scaled"):
        env = EnvConfig(task=task, max_episode_steps=args.max_episode_steps)
        rows += measure(path, env, ["ddpm:100", "rti"], rti, args.calls, args.episodes, args.seed, label="gripper-scaled")

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "latency.json").write_text(json.dumps(rows, indent=2))
    plot(rows, out / "latency.png")
    print(f"\nbatch 1, one CPU thread, {args.episodes} episodes per row, rti.timesteps={rti.timesteps}\n")
    print(format_rows(rows))
    print(f"\n{out / 'latency.json'}, {out / 'latency.png'}")


if __name__ == "__main__":
    guarded(main)
