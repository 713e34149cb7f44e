"""RL-100 stage reports against issue 8's targets: success after imitation, offline, online and for
the one-step head, and how often the OPE gate let a worse policy through.

Per task: `--demos` motion-planning demos and a Diffusion Policy teacher trained on them for
`--teacher-minutes` (or `--init`, a teacher you already have), then `robodistill rl100` with
stages offline, online, distill from that teacher. Tasks run side by side, one pinned core each,
one thread. A task whose run directory holds a finished report is reused; an unfinished one
continues (`resume_from`), so a killed benchmark loses at most one offline iteration or online
checkpoint. Either only if made with the same flags (bench-settings.json; another --out otherwise).

Prints, per task, the stage table (success_once with 95% Wilson intervals over `--episodes`
fixed-seed episodes), the gate's record (candidates accepted, and the worst true drop of an
accepted candidate below the reference it replaced, each measured on `--gate-episodes`
episodes) and the targets: final >= 99%, above imitation, head within 2 points of the final
policy, no accepted candidate more than 3 points worse. Each run's report.md and ope.png
(estimate vs true success per candidate) are in its directory.

    taskset -c 0,1 .venv/bin/python benchmarks/rl100.py [--tasks PushCube-v1 PickCube-v1] [--cores 0 1]
        [--init PickCube-v1=path/last.pt] [--out runs/bench-rl100] [-- offline.amq_penalty=0 ...]

Sizing on one core (PushCube, 100-step episodes): 100 demos ~5 min, teacher 10 min, offline
(3 iterations, 50-episode gate checks) ~40 min, online 60k env steps ~13 min, head ~6 min,
evaluations (200 episodes per stage) ~10 min: about 1.5 h per task.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import RD, absolute, check_child, check_tasks, counts, guarded, same_settings, settings, trained

ROOT = Path(__file__).resolve().parent.parent
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
FINAL, HEAD_GAP, GATE_DROP = 0.99, 0.02, 0.03


def run(cmd: list, log: Path, core: int) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        code = subprocess.call(["taskset", "-c", str(core), *map(str, cmd)], stdout=f, stderr=subprocess.STDOUT, env=ONE_THREAD)
    check_child(cmd, code, log)


def inputs(task: str, a: argparse.Namespace) -> tuple[Path, Path]:
    """Where the task's demos (the offline buffer's start) and the imitation policy RL-100 starts from are, or go."""
    out = a.out / task
    dataset = Path(a.dataset[task]) if task in a.dataset else out / "demos" / f"mp_n{a.demos}_seed0.state.pd_ee_delta_pos.h5"
    return dataset, Path(a.init[task]) if task in a.init else out / "teacher" / "checkpoints" / "last.pt"


def teacher(task: str, a: argparse.Namespace, out: Path, core: int) -> tuple[Path, Path]:
    """The demos and the teacher, made where missing (a teacher killed part way goes on)."""
    dataset, ckpt = inputs(task, a)
    if not dataset.is_file():
        run([*RD, "demos", f"env={task}", f"n={a.demos}", "seed=0", "workers=1", f"out={dataset.parent}"], out / "demos.log", core)
    if task in a.init:
        return dataset, ckpt
    train = teacher_command(task, dataset, a, out)
    if not ckpt.is_file() or not trained(ckpt, train):
        run([*train, *([f"resume_from={ckpt}"] if ckpt.is_file() else [])], out / "teacher.log", core)
    return dataset, ckpt


def teacher_command(task: str, dataset: Path, a: argparse.Namespace, out: Path) -> list:
    return [*RD, "train-teacher", f"env={task}", f"dataset={dataset}", f"minutes={a.teacher_minutes}", "iterations=1000000",
            "eval_every=0", "eval_episodes=0", "val_fraction=0", "threads=1", f"hydra.run.dir={out / 'teacher'}"]


def rl100_command(task: str, dataset: Path, init: Path, a: argparse.Namespace, run_dir: Path) -> list:
    return [*RD, "rl100", f"env={task}", f"env.max_episode_steps={a.max_episode_steps}", f"dataset={dataset}", f"init={init}",
            "stages=[offline,online,distill]", f"eval_episodes={a.episodes}", f"offline.gate_eval_episodes={a.gate_episodes}",
            f"online.env_steps={a.online_steps}", *a.overrides, f"hydra.run.dir={run_dir}"]


def check_reuse(task: str, a: argparse.Namespace) -> None:
    """Before any work: a teacher or RL-100 run made with other flags would be reported under these."""
    out = a.out / task
    dataset, init = inputs(task, a)
    made = {}
    if task not in a.init:
        made["teacher"] = settings(teacher_command(task, dataset, a, out))
        same_settings(out / "teacher", made["teacher"], init.is_file())
    run_dir = out / "rl100"
    same_settings(run_dir, {**made, **settings(rl100_command(task, dataset, init, a, run_dir))}, (run_dir / "report.json").is_file())


def rl100(task: str, a: argparse.Namespace, core: int) -> dict:
    out = a.out / task
    run_dir = out / "rl100"
    report = run_dir / "report.json"
    if report.is_file() and "distill" in json.loads(report.read_text())["stages"]:
        return json.loads(report.read_text())
    dataset, init = teacher(task, a, out, core)
    print(f"[{time.strftime('%H:%M:%S')}] {task}: rl100 on core {core} from {init}", flush=True)
    place = [f"resume_from={run_dir}"] if report.is_file() else []
    run([*rl100_command(task, dataset, init, a, run_dir), *place], out / "rl100.log", core)
    print(f"[{time.strftime('%H:%M:%S')}] {task}: done", flush=True)
    return json.loads(report.read_text())


def pct(r: dict) -> str:
    return f"{r['success_once']:.1%} [{r['ci95'][0]:.1%}, {r['ci95'][1]:.1%}]"


def summarize(task: str, report: dict) -> str:
    st = report["stages"]
    lines = [f"\n{task}", f"{'stage':<34}{'success_once [95% CI]':<26}episodes"]
    rows = [("init (imitation, DDIM)", st["init"])]
    rows += [(f"offline iteration {it['iteration']} (reference)", it) for it in st.get("offline_iterations", [])]
    rows += [(label, st[k]) for k, label in (("offline", "offline"), ("online", "online"), ("distill", "one-step head")) if k in st]
    lines += [f"{label:<34}{pct(r):<26}{r['episodes']}" for label, r in rows]
    dec = report["decisions"]
    accepted = [d for d in dec if d["accepted"]]
    worst = max((d["true_reference"] - d["true"] for d in accepted), default=0.0)
    final, init, head = st["online"]["success_once"], st["init"]["success_once"], st["distill"]["success_once"]
    check = lambda ok: "met" if ok else "MISSED"  # noqa: E731
    lines += [f"gate: accepted {len(accepted)} of {len(dec)} candidates; worst true drop of an accepted one {worst * 100:+.0f} points",
              "targets (issue 8)",
              f"  final (online) >= {FINAL:.0%}: {final:.1%}: {check(final >= FINAL)}",
              f"  final above imitation ({init:.1%}): {check(final > init)}",
              f"  head within {HEAD_GAP * 100:.0f} points of final: {(head - final) * 100:+.1f}: {check(head >= final - HEAD_GAP)}",
              f"  no accepted candidate > {GATE_DROP * 100:.0f} points worse: {worst * 100:.0f}: {check(worst <= GATE_DROP)}"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", default=["PushCube-v1", "PickCube-v1"])
    ap.add_argument("--cores", type=int, nargs="+", default=[0, 1], help="one task at a time on each")
    ap.add_argument("--demos", type=int, default=100)
    ap.add_argument("--teacher-minutes", type=float, default=10.0)
    ap.add_argument("--dataset", nargs="*", default=[], metavar="TASK=H5", help="these demos instead of generating --demos")
    ap.add_argument("--init", nargs="*", default=[], metavar="TASK=CHECKPOINT", help="start from this teacher instead of training one")
    ap.add_argument("--max-episode-steps", type=int, default=100, help="motion-planning demos take longer than PushCube's default 50")
    ap.add_argument("--episodes", type=int, default=200, help="evaluation episodes per stage")
    ap.add_argument("--gate-episodes", type=int, default=50, help="true success of every gate candidate (logged, never used to decide)")
    ap.add_argument("--online-steps", type=int, default=60_000)
    ap.add_argument("--out", type=absolute, default=ROOT / "runs" / "bench-rl100")
    ap.add_argument("overrides", nargs="*", help="more `robodistill rl100` overrides, after --")
    a = ap.parse_args()
    for flag in ("dataset", "init"):
        pairs = getattr(a, flag)
        if any("=" not in kv for kv in pairs):
            ap.error(f"--{flag} takes TASK=PATH pairs, e.g. --{flag} PickCube-v1=runs/x/{'demos.h5' if flag == 'dataset' else 'last.pt'}")
        setattr(a, flag, {task: str(absolute(path)) for task, path in (kv.split("=", 1) for kv in pairs)})
        missing = [f"{task}={path}" for task, path in getattr(a, flag).items() if not Path(path).is_file()]
        if missing:
            ap.error(f"--{flag} {' '.join(missing)}: no such file")
    check_tasks("--tasks", a.tasks)
    counts(a, "--demos", "--max-episode-steps", "--episodes", "--online-steps")
    for task in a.tasks:
        check_reuse(task, a)
    free = queue.Queue()
    for core in a.cores:
        free.put(core)

    def on_a_free_core(task: str) -> dict:
        core = free.get()
        try:
            return rl100(task, a, core)
        finally:
            free.put(core)

    start = time.perf_counter()
    with ThreadPoolExecutor(len(a.cores)) as pool:
        reports = list(pool.map(on_a_free_core, a.tasks))
    text = "\n".join(summarize(task, r) for task, r in zip(a.tasks, reports))
    print(text)
    (a.out / "rl100.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "reports": dict(zip(a.tasks, reports)),
                                                  "table": text}, indent=2))
    print(f"\n{time.perf_counter() - start:.0f}s; per-run report.md and ope.png under {a.out}/<task>/rl100; all numbers: {a.out / 'rl100.json'}")


if __name__ == "__main__":
    guarded(main)
