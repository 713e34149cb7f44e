"""PPO vs RPD with a deliberately imperfect teacher: env steps to 80% success, final success, throughput.

Per task: `--teacher-demos` motion-planning demos (10 by default: few on purpose), a Diffusion
Policy teacher trained on them for `--teacher-minutes`, its success over 100 episodes (the line to
beat). Then, for every reward mode and seed, `robodistill rpd` twice with identical settings and
the same env-step budget: teacher=none (PPO) and teacher=<the teacher> (RPD). Runs go
one at a time on each of `--cores`, pinned, with one thread. Every `--eval-every` env steps
a run evaluates its student on `--eval-episodes` episodes (the shared evaluation, fixed seeds).

Prints one markdown table per task and reward: env steps to reach 80% success_once (the first
evaluation at or above it; "never" within the budget), final success with its 95% interval (mean
over seeds, and each seed), training env steps/s (evaluation excluded); and writes rpd.json and
rpd.png (success vs env steps, one panel per task and reward, the teacher as a dashed line; the
evaluation return below each).

    taskset -c 0,1 .venv/bin/python benchmarks/rpd.py [--tasks PushCube-v1] [--rewards dense sparse]
        [--seeds 0 1 2] [--steps 200000] [--cores 0 1] [--out runs/bench-rpd]

Sizing on 2 CPU cores: a PushCube run trains at ~120 env steps/s (dense; two runs at a time), so 200k
steps with 30-episode evaluations every 10k (`--eval-episodes 30`, as in results/rpd.md) is ~35 min
per run and the default grid (1 task x 2 rewards x 3 seeds x 2 methods = 12 runs, 2 at a time) ~3.5 h.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np

from robodistill.training.rpd import RPDConfig

from common import RD, absolute, at_least, check_child, check_tasks, counts, distinct, guarded, same_settings, settings, trained

ROOT = Path(__file__).resolve().parent.parent
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run(cmd: list, log: Path, core: int | None = None) -> subprocess.Popen:
    prefix = ["taskset", "-c", str(core)] if core is not None else []
    log.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(prefix + [str(c) for c in cmd], stdout=log.open("a"), stderr=subprocess.STDOUT, env=ONE_THREAD)


def wait(proc: subprocess.Popen, log: Path) -> None:
    check_child(proc.args, proc.wait(), log)


def run_on_cores(jobs: list[tuple], cores: list[int], on_done) -> None:
    """`robodistill rpd` jobs (key, run dir, command), one at a time on each core, pinned; a job whose
    run dir already holds student.zip is reused, not rerun, and one killed part way continues from its
    last checkpoint, both only if made with the same command. `on_done(key, run_dir)` after each."""
    for _, run_dir, cmd in jobs:
        same_settings(run_dir, settings(cmd), made=(run_dir / "student.zip").is_file() or (run_dir / "checkpoints" / "last.zip").is_file())
    pending = list(jobs)
    running: dict[int, tuple] = {}
    try:
        while pending or running:
            for core in cores:
                if core not in running and pending:
                    key, run_dir, cmd = pending.pop(0)
                    if (run_dir / "student.zip").is_file():  # finished earlier: reuse
                        print(f"reusing {run_dir}", flush=True)
                        on_done(key, run_dir)
                        continue
                    if (run_dir / "checkpoints" / "last.zip").is_file():
                        cmd = [*cmd, f"resume_from={run_dir}"]
                    running[core] = (key, run_dir, run(cmd, run_dir / "run.log", core))
                    print(f"[{time.strftime('%H:%M:%S')}] start {key} on core {core}", flush=True)
            for core, (key, run_dir, proc) in list(running.items()):
                if proc.poll() is not None:
                    del running[core]
                    wait(proc, run_dir / "run.log")
                    on_done(key, run_dir)
                    print(f"[{time.strftime('%H:%M:%S')}] done {key}: final success_once "
                          f"{json.loads((run_dir / 'history.json').read_text())[-1]['success_once']:.0%}", flush=True)
            time.sleep(2)
    finally:  # a job failed (or Ctrl-C): the others would run on unseen, each holding a core; their checkpoints stay
        for *_, proc in running.values():
            proc.terminate()
            proc.wait()


def make_teacher(task: str, a: argparse.Namespace, out: Path) -> tuple[Path, dict]:
    """Few demos, a short training: a teacher that is useful but far from perfect (on the last core)."""
    core = a.cores[-1]
    root = out / "teachers" / task
    ds_dir, train_dir, eval_dir = root / "demos", root / "train", root / "eval"
    dataset = ds_dir / f"mp_n{a.teacher_demos}_seed0.state.pd_ee_delta_pos.h5"
    ckpt = train_dir / "checkpoints" / "last.pt"
    train = [*RD, "train-teacher", f"env={task}", f"dataset={dataset}", f"minutes={a.teacher_minutes}", "iterations=100000",
             "eval_every=0", "eval_episodes=0", "val_fraction=0", "threads=1", f"hydra.run.dir={train_dir}"]
    # The student's env (episode length included), so the line is comparable.
    evaluate = [*RD, "eval", f"env={task}", f"env.max_episode_steps={a.max_episode_steps}", f"policy={ckpt}", "episodes=100",
                "seed=10000", f"hydra.run.dir={eval_dir}"]
    made = {train_dir: ckpt.is_file(), eval_dir: (eval_dir / "eval.json").is_file()}
    same_settings(train_dir, settings(train), made[train_dir])
    same_settings(eval_dir, {"teacher": settings(train), **settings(evaluate)}, made[eval_dir])
    if not dataset.is_file():
        wait(run([*RD, "demos", f"env={task}", f"n={a.teacher_demos}", "seed=0", "workers=1", f"out={ds_dir}"], ds_dir / "demos.log", core), ds_dir / "demos.log")
    if made[train_dir] and not trained(ckpt, train):
        made[train_dir], train = False, [*train, f"resume_from={ckpt}"]
    for run_dir, cmd in ((train_dir, train), (eval_dir, evaluate)):
        if made[run_dir]:
            print(f"reusing {run_dir}", flush=True)
        else:
            wait(run(cmd, root / f"{run_dir.name}.log", core), root / f"{run_dir.name}.log")
    return ckpt, json.loads((eval_dir / "eval.json").read_text())["summary"]["success_once"]


def steps_to(history: list[dict], level: float) -> int | None:
    return next((h["step"] for h in history if h["success_once"] >= level), None)


def summarize(rows: list[dict], teachers: dict) -> str:
    out = []
    for (task, reward), group in itertools.groupby(sorted(rows, key=lambda r: (r["task"], r["reward"])), key=lambda r: (r["task"], r["reward"])):
        group = list(group)
        t = teachers[task]
        out.append(f"\n{task}, {reward} reward; teacher success_once {t['rate']:.0%} [{t['ci95'][0]:.0%}, {t['ci95'][1]:.0%}]\n")
        out.append("| method | seeds | env steps to 80% (per seed) | final success_once (mean; per seed [95% CI]) | train env steps/s |")
        out.append("|---|---:|---|---|---:|")
        for method in ("PPO", "RPD"):
            runs = [r for r in group if r["method"] == method]
            if not runs:
                continue
            reach = [steps_to(r["history"], 0.8) for r in runs]
            finals = [r["history"][-1] for r in runs]
            per_seed = "; ".join(f"{f['success_once']:.0%} [{f['ci95'][0]:.0%}, {f['ci95'][1]:.0%}]" for f in finals)
            speed = np.mean([f["train_steps_per_second"] for f in finals])
            out.append(f"| {method} | {len(runs)} | {', '.join('never' if s is None else f'{s:,}' for s in reach)} | "
                       f"{np.mean([f['success_once'] for f in finals]):.0%}; {per_seed} | {speed:.0f} |")
    return "\n".join(out)


def plot(rows: list[dict], teachers: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["task"], r["reward"]) for r in rows})
    # Below each success panel the evaluation return: where every run stays at 0% success it still shows
    # which one is getting closer.
    fig, axes = plt.subplots(2, len(panels), figsize=(5 * len(panels), 6.4), squeeze=False, sharex="col")
    for (ax, ax_return), (task, reward) in zip(axes.T, panels):
        for method, color in (("PPO", "tab:blue"), ("RPD", "tab:orange")):
            runs = [r for r in rows if (r["task"], r["reward"], r["method"]) == (task, reward, method)]
            for i, r in enumerate(runs):
                steps = [h["step"] for h in r["history"]]
                ax.plot(steps, [h["success_once"] for h in r["history"]], color=color, alpha=0.8,
                        label=method if i == 0 else None)
                ax_return.plot(steps, [h["return"] for h in r["history"]], color=color, alpha=0.8)
        ax.axhline(teachers[task]["rate"], color="gray", ls="--", label="teacher")
        ax.axhline(0.8, color="gray", ls=":", lw=0.8)
        ax.set(title=f"{task}, {reward}", ylabel="success_once", ylim=(-0.02, 1.02))
        ax.legend(loc="lower right")
        ax_return.set(xlabel="env steps", ylabel="evaluation return (mean)")
        ax_return.ticklabel_format(axis="x", style="sci", scilimits=(3, 3))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", nargs="+", default=["PushCube-v1"])
    ap.add_argument("--rewards", nargs="+", default=["dense", "sparse"], choices=["dense", "sparse"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=200_000, help="env steps per run (the same for PPO and RPD)")
    ap.add_argument("--eval-every", type=int, default=10_000)
    ap.add_argument("--eval-episodes", type=int, default=50)
    ap.add_argument("--max-episode-steps", type=int, default=100,
                    help="for students and teacher alike; motion-planning demos (and so the teacher) take longer than PushCube's default 50")
    ap.add_argument("--teacher-demos", type=int, default=10)
    ap.add_argument("--teacher-minutes", type=float, default=2.0)
    ap.add_argument("--cores", type=int, nargs="+", default=[0, 1], help="one run at a time on each")
    ap.add_argument("--rpd", nargs="*", default=[], metavar="KEY=VALUE",
                    help="overrides for the RPD runs only, e.g. distill_coef=0.1 schedule=cosine (PPO runs keep teacher=none)")
    ap.add_argument("--teachers-only", action="store_true", help="make and evaluate the teachers, then stop")
    ap.add_argument("--out", type=absolute, default=ROOT / "runs" / "bench-rpd" / time.strftime("%Y-%m-%d_%H-%M-%S"))
    a = ap.parse_args()
    check_tasks("--tasks", a.tasks)
    for flag in ("--tasks", "--rewards", "--seeds"):
        distinct(flag, getattr(a, flag[2:]))
    at_least("--steps", a.steps, RPDConfig.n_steps)  # one rollout of the PPO runs, which take no --rpd overrides
    at_least("--eval-every", a.eval_every, 0)
    counts(a, "--eval-episodes", "--max-episode-steps", "--teacher-demos")
    at_least("--teacher-minutes", a.teacher_minutes, 0)
    teachers, ckpts = {}, {}
    for task in a.tasks:
        ckpts[task], teachers[task] = make_teacher(task, a, a.out)
        print(f"[{time.strftime('%H:%M:%S')}] {task} teacher: success_once {teachers[task]['rate']:.0%} ({ckpts[task]})", flush=True)
    if a.teachers_only:
        return

    jobs = []
    for task, reward, seed, method in itertools.product(a.tasks, a.rewards, a.seeds, ("PPO", "RPD")):
        run_dir = a.out / task / reward / f"{method}-seed{seed}"
        cmd = [*RD, "rpd", f"env={task}", f"env.reward_mode={'sparse' if reward == 'sparse' else 'normalized_dense'}",
               f"env.max_episode_steps={a.max_episode_steps}",
               f"teacher={ckpts[task] if method == 'RPD' else 'none'}", f"total_steps={a.steps}", f"seed={seed}",
               f"eval_every={a.eval_every}", f"eval_episodes={a.eval_episodes}", "progress=false", f"hydra.run.dir={run_dir}",
               *(a.rpd if method == "RPD" else [])]
        jobs.append(((task, reward, seed, method), run_dir, cmd))
    rows: list[dict] = []

    def done(key: tuple, run_dir: Path) -> None:
        rows.append({**dict(zip(("task", "reward", "seed", "method"), key)),
                     "history": json.loads((run_dir / "history.json").read_text())})
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "rpd.json").write_text(json.dumps({"teachers": teachers, "steps": a.steps, "rpd": a.rpd, "rows": rows}, indent=2))

    run_on_cores(jobs, a.cores, done)
    text = summarize(rows, teachers)
    print(text)
    (a.out / "rpd.json").write_text(json.dumps({"teachers": teachers, "steps": a.steps, "rpd": a.rpd, "rows": rows, "table": text}, indent=2))
    plot(rows, teachers, a.out / "rpd.png")
    print(f"\nraw numbers: {a.out / 'rpd.json'}; plot: {a.out / 'rpd.png'}")


if __name__ == "__main__":
    guarded(main)
