"""The small VLA per task, and RPD students distilled from it: success with intervals, side by side.

1. `robodistill train-vla` on `--tasks` (demos made where missing, `--demos` per task) for
   `--vla-minutes` of training; 2. the VLA evaluated on every task (`--eval-episodes`, fixed seeds);
3. per task and seed, `robodistill rpd teacher=<the VLA>` for `--rpd-steps` env steps, one run at a
   time on each of `--cores`; its final evaluation uses the same episodes. `--student state` (the
   default): an MLP on the simulator's state, the VLA shown camera images rendered from the student's
   states only where it is asked (`teacher_obs_mode=rgb`); `--student rgb`: a CNN on the VLA's own
   camera and proprioception, rendered every step.

Prints a markdown table (VLA vs student per task, whether the student beats the VLA) and writes
vla_rpd.json and vla_rpd.png (success per task, intervals as error bars) under `--out`.

    taskset -c 0,1 .venv/bin/python benchmarks/vla_rpd.py [--tasks PushCube-v1 PickCube-v1 PullCube-v1 LiftPegUpright-v1]
        [--demos 40] [--vla-iterations 25000] [--student state] [--rpd-steps 200000] [--seeds 0] [--cores 0 1]
        [--out runs/bench-vla-rpd] [--rpd warm_start_steps=10000 distill_coef=0.1 schedule=cosine]

Sizing on 2 CPU cores: a camera frame costs ~25 ms here whatever its size (lavapipe), so RGB
simulation runs at ~30 env steps/s and an RGB student trains at 16-25; a state student, whose teacher
is rendered two frames per eight steps, trains several times faster. The full default grid still
takes hours here: shrink it (`--demos`, `--vla-minutes`, `--rpd-steps`, `--eval-episodes`) or run it
on a bigger machine. A second call with the same `--out` reuses the VLA, its evaluations and the
students it finds, each only if made with the same flags (bench-settings.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RD, absolute, check_tasks, counts, distinct, guarded, same_settings, settings, trained  # noqa: E402
from rpd import run, run_on_cores, wait  # noqa: E402  (the same way of running pinned, single-thread jobs)

ROOT = Path(__file__).resolve().parent.parent


def env_args(task: str, a: argparse.Namespace, obs_mode: str = "rgb") -> list[str]:
    return [f"env={task}", f"env.obs_mode={obs_mode}", f"env.control_mode={a.control_mode}", f"env.image_size={a.image_size}",
            f"env.max_episode_steps={a.max_episode_steps}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", nargs="+", default=["PushCube-v1", "PickCube-v1", "PullCube-v1", "LiftPegUpright-v1"])
    ap.add_argument("--demos", type=int, default=40, help="motion-planning demos per task")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--control-mode", default="pd_ee_delta_pose")
    ap.add_argument("--max-episode-steps", type=int, default=200)
    ap.add_argument("--vla-iterations", type=int, default=25_000,
                    help="the learning-rate schedule's length: a run stopped by --vla-minutes first does not finish decaying it (77-93 min on one core here)")
    ap.add_argument("--vla-minutes", type=float, default=120.0, help="a bound on the VLA's training time")
    ap.add_argument("--eval-episodes", type=int, default=50)
    ap.add_argument("--student", choices=("state", "rgb"), default="state", help="what the RPD student sees")
    ap.add_argument("--rpd-steps", type=int, default=200_000, help="the RPD benchmark's budget")
    ap.add_argument("--rpd-eval-every", type=int, default=20_000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--cores", type=int, nargs="+", default=[0, 1], help="one RPD run at a time on each")
    ap.add_argument("--rpd", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every RPD run, e.g. distill_coef=1.0")
    ap.add_argument("--out", type=absolute, default=ROOT / "runs" / "bench-vla-rpd" / time.strftime("%Y-%m-%d_%H-%M-%S"))
    a = ap.parse_args()
    check_tasks("--tasks", a.tasks)
    for flag in ("--tasks", "--seeds"):
        distinct(flag, getattr(a, flag[2:]))
    counts(a, "--demos", "--image-size", "--max-episode-steps", "--vla-iterations", "--eval-episodes", "--rpd-steps")
    a.out.mkdir(parents=True, exist_ok=True)

    vla_dir = a.out / "vla"
    ckpt = vla_dir / "checkpoints" / "last.pt"
    train = [*RD, "train-vla", f"tasks=[{','.join(a.tasks)}]", f"demos={a.demos}", f"datasets={a.out / 'datasets'}",
             f"image_size={a.image_size}", f"control_mode={a.control_mode}", f"max_episode_steps={a.max_episode_steps}",
             f"minutes={a.vla_minutes}", f"iterations={a.vla_iterations}", "eval_every=0", "eval_episodes=0", "threads=1",
             f"workers={len(a.cores)}", f"hydra.run.dir={vla_dir}"]
    evals = {task: [*RD, "eval", f"policy={ckpt}", *env_args(task, a), f"episodes={a.eval_episodes}", "seed=10000",
                    f"hydra.run.dir={a.out / 'eval' / task}"] for task in a.tasks}
    # A VLA (and its evaluations) made with other flags would be reported under these: checked before any work.
    same_settings(vla_dir, settings(train), ckpt.is_file())
    for task, cmd in evals.items():
        eval_dir = a.out / "eval" / task
        same_settings(eval_dir, {"vla": settings(train), **settings(cmd)}, (eval_dir / "eval.json").is_file())
    if not ckpt.is_file() or not trained(ckpt, train):
        log = a.out / "vla.log"
        wait(run([*train, *([f"resume_from={ckpt}"] if ckpt.is_file() else [])], log, a.cores[0]), log)
    print(f"[{time.strftime('%H:%M:%S')}] VLA: {ckpt}", flush=True)

    vla: dict[str, dict] = {}
    for task in a.tasks:
        eval_dir = a.out / "eval" / task
        if not (eval_dir / "eval.json").is_file():
            log = eval_dir / "eval.log"
            wait(run(evals[task], log, a.cores[0]), log)
        vla[task] = json.loads((eval_dir / "eval.json").read_text())["summary"]["success_once"]
        print(f"[{time.strftime('%H:%M:%S')}] VLA on {task}: {vla[task]['rate']:.0%}", flush=True)

    students: dict[str, list[dict]] = {task: [] for task in a.tasks}
    sees = ["teacher_obs_mode=rgb"] if a.student == "state" else []
    jobs = [((task, seed), run_dir, [*RD, "rpd", *env_args(task, a, a.student), *sees, f"teacher={ckpt}", f"total_steps={a.rpd_steps}",
                                     f"seed={seed}", f"eval_every={a.rpd_eval_every}", f"eval_episodes={a.eval_episodes}", "progress=false",
                                     f"hydra.run.dir={run_dir}", *a.rpd])
            for task in a.tasks for seed in a.seeds for run_dir in [a.out / f"rpd-{a.student}" / task / f"seed{seed}"]]
    run_on_cores(jobs, a.cores, lambda key, run_dir: students[key[0]].append(json.loads((run_dir / "history.json").read_text())[-1]))

    rows = [f"| task | VLA success_once [95% CI] | RPD {a.student} student(s) final success_once [95% CI] | student beats VLA |", "|---|---|---|---|"]
    for task in a.tasks:
        v = vla[task]
        s = students[task]
        mean = np.mean([x["success_once"] for x in s])
        per_seed = "; ".join(f"{x['success_once']:.0%} [{x['ci95'][0]:.0%}, {x['ci95'][1]:.0%}]" for x in s)
        rows.append(f"| {task} | {v['rate']:.0%} [{v['ci95'][0]:.0%}, {v['ci95'][1]:.0%}] | {per_seed} | "
                    f"{'yes' if mean > v['rate'] else 'no'} |")
    table = "\n".join(rows)
    print(table)
    (a.out / "vla_rpd.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "vla": vla,
                                                    "students": students, "table": table}, indent=2))
    plot(a.tasks, vla, students, a.out / "vla_rpd.png")
    print(f"\nraw numbers: {a.out / 'vla_rpd.json'}; plot: {a.out / 'vla_rpd.png'}")


def plot(tasks: list[str], vla: dict, students: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(len(tasks))
    fig, ax = plt.subplots(figsize=(1.8 * len(tasks) + 2, 3.6))
    for offset, name, values in ((-0.2, "VLA", [vla[t] for t in tasks]),
                                 (0.2, "RPD student", [students[t][0] for t in tasks])):
        rate = np.array([v.get("rate", v.get("success_once")) for v in values])
        ci = np.array([v["ci95"] for v in values])
        ax.bar(x + offset, rate, 0.4, label=name, yerr=[rate - ci[:, 0], ci[:, 1] - rate], capsize=3)
    ax.set(xticks=x, xticklabels=tasks, ylabel="success_once", ylim=(0, 1.05), title="VLA vs RPD students (95% intervals)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    guarded(main)
