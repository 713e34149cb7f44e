"""Teacher vs ManiSkill's diffusion-policy baseline: same demos, same CPU, same wall-clock budget.

Training runs of `--minutes` each, one after the other, one thread each, on every task:
  - robodistill's teacher (`robodistill train-teacher`, MLP denoiser, batch 256, lr 1e-3,
    val_fraction=0 so it sees every demo, as the baseline does),
  - ManiSkill's `examples/baselines/diffusion_policy/train.py` (4.3M-parameter U-Net, lr 1e-4) at
    batch 64 and at its default batch 1024,
each followed by 100 evaluation episodes (max_episode_steps 100, episode k reset with seed
`--seed + k` on both sides). All runs use the same .h5 (state observations, pd_ee_delta_pos).
Runs go method by method, so the teacher and the batch-64 baseline finish on every task first.
One markdown table: samples/s, iterations, success_once and success_at_end with 95% Wilson
intervals, evaluation wall time (process start to exit). Raw numbers go to `<out>/teacher.json`,
rewritten after every run. With the defaults: about 1 h 45 min on one core (a teacher run ~12 min,
a baseline run ~20 min: its 100-step DDPM sampling makes 100 episodes take ~9 min).

    taskset -c 1 .venv/bin/python benchmarks/teacher.py [--minutes 10] [--tasks PushCube-v1 PickCube-v1]
        [--maniskill-repo PATH_OR_URL] [--episodes 100] [--out runs/bench-teacher]

The baseline is never committed: at benchmark time `examples/baselines/diffusion_policy` is copied
out of `--maniskill-repo` (a bare git dir or a checkout; default the upstream repository
https://github.com/haosulab/ManiSkill, cloned shallow into the cache when given as a URL) into
`--cache` (default ~/.cache/robodistill/benchmarks/maniskill_dp/), next to a virtual environment
of its own with pinned packages (its train.py needs gymnasium 0.29.1: `gym.wrappers.FrameStack`
and the old `final_info` format). Both are reused when present.

The baseline's code is run unpatched. It has no time budget, so it runs with a huge
`--total-iters` (its cosine LR schedule then stays at its peak 1e-4 after warm-up), saves a
checkpoint every `--save-freq` iterations, evaluates nothing during training
(`--num-eval-episodes 0`), and is killed `--minutes` after its first logged iteration; the newest
checkpoint is evaluated (EMA weights) by benchmarks/maniskill_dp_eval.py with the baseline's own
`Agent`, `make_eval_envs` and `evaluate`. Its iterations and train time are those of that
checkpoint (training time includes its checkpoint saves; robodistill's excludes them).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from robodistill.evaluation import wilson_interval
from robodistill.policies.diffusion.policy import DiffusionPolicy

from common import absolute, check_tasks, counts, guarded

ROOT = Path(__file__).resolve().parent.parent
UPSTREAM = "https://github.com/haosulab/ManiSkill"
BASELINE = "examples/baselines/diffusion_policy"
BASELINE_PACKAGES = ["numpy<2", "mani_skill==3.0.1", "gymnasium==0.29.1", "diffusers", "tyro", "tensorboard", "h5py"]
TASKS = ["PushCube-v1", "PickCube-v1"]
DEMOS = "mp_n100_seed0.state.pd_ee_delta_pos.h5"  # what `robodistill demos n=100 seed=0` writes
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run(cmd: list, log: Path) -> float:
    """Run to completion with output to `log`; wall seconds."""
    start = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        subprocess.run([str(c) for c in cmd], env=ONE_THREAD, stdout=f, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - start


def prepare_baseline(repo: str, cache: Path) -> tuple[Path, Path]:
    """The baseline folder and its venv's python, made once under `cache`."""
    src, python = cache / BASELINE, cache / "venv" / "bin" / "python"
    if not src.is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        if "://" in repo:
            subprocess.run(["git", "clone", "--depth", "1", "--filter=blob:none", "--sparse", repo, cache / "ManiSkill"], check=True)
            subprocess.run(["git", "-C", cache / "ManiSkill", "sparse-checkout", "set", BASELINE], check=True)
            shutil.copytree(cache / "ManiSkill" / BASELINE, src)
        else:
            git_dir = Path(repo) / ".git" if (Path(repo) / ".git").exists() else Path(repo)
            archive = subprocess.run(["git", f"--git-dir={git_dir}", "archive", "HEAD", BASELINE], check=True, capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", cache], input=archive, check=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", cache / "venv"], check=True)
        # CPU torch first, pinned, so nothing below pulls a CUDA build.
        subprocess.run([python, "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", *BASELINE_PACKAGES], check=True)
    return src, python


def ensure_dataset(task: str, path: str) -> str:
    path = Path(path).resolve()
    if not path.exists():
        print(f"{path} missing: recording 100 motion-planning demos of {task}", flush=True)
        run([ROOT / ".venv/bin/robodistill", "demos", f"env={task}", "n=100", "seed=0", f"out={path.parent}"], path.with_suffix(".log"))
        if not path.exists():
            raise FileNotFoundError(f"`robodistill demos` did not write {path}: see {path.with_suffix('.log')}")
    return str(path)


def rate(k: int, n: int) -> dict:
    return {"rate": k / n, "count": k, "ci95": list(wilson_interval(k, n))}


def robodistill_run(task: str, dataset: str, a: argparse.Namespace, out: Path) -> dict:
    train_dir, eval_dir = out / "train", out / "eval"
    rd = ROOT / ".venv/bin/robodistill"
    # val_fraction=0: train on every demo, as the baseline does.
    run([rd, "train-teacher", f"env={task}", f"dataset={dataset}", f"minutes={a.minutes}", "iterations=10000000",
         "eval_every=0", "eval_episodes=0", "threads=1", "batch_size=256", "val_fraction=0",
         f"name=bench-{task}", f"hydra.run.dir={train_dir}"], out / "train.log")
    last = json.loads((train_dir / "metrics.jsonl").read_text().splitlines()[-1])
    spec = torch.load(train_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)["policy"]
    params = sum(p.numel() for p in DiffusionPolicy.from_spec(spec).parameters())
    eval_seconds = run([rd, "eval", f"env={task}", "env.max_episode_steps=100", f"policy={train_dir}/checkpoints/last.pt",
                        f"episodes={a.episodes}", f"seed={a.seed}", f"hydra.run.dir={eval_dir}"], out / "eval.log")
    s = json.loads((eval_dir / "eval.json").read_text())["summary"]
    return {"batch": 256, "params": params, "iterations": last["step"], "train_seconds": last["train_seconds"],
            "success_once": s["success_once"], "success_at_end": s["success_at_end"], "episodes": s["episodes"],
            "eval_seconds": eval_seconds}


def newest_checkpoints(ckpt_dir: Path) -> list[Path]:
    return sorted(ckpt_dir.glob("*.pt"), key=lambda p: int(p.stem), reverse=True) if ckpt_dir.is_dir() else []


def baseline_run(task: str, dataset: str, batch: int, save_freq: int, src: Path, python: Path,
                 a: argparse.Namespace, out: Path) -> dict:
    cmd = [python, "-u", src / "train.py", "--env-id", task, "--demo-path", dataset, "--control-mode", "pd_ee_delta_pos",
           "--sim-backend", "cpu", "--max-episode-steps", "100", "--total-iters", "100000000", "--batch-size", batch,
           "--log-freq", "100", "--eval-freq", "100000000", "--num-eval-episodes", "0", "--num-eval-envs", "1",
           "--save-freq", save_freq, "--no-capture-video", "--exp-name", "run"]
    ckpt_dir = out / "runs" / "run" / "checkpoints"
    out.mkdir(parents=True, exist_ok=True)
    log = (out / "train.log").open("w")
    proc = subprocess.Popen([str(c) for c in cmd], cwd=out, env=ONE_THREAD, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    # The clock starts at the first training iteration, after imports, dataset and env setup, as
    # robodistill's `minutes` counts training time only.
    t0 = None
    for line in proc.stdout:
        log.write(line)
        if line.startswith("Iteration 0,"):
            t0 = time.time()
            break
    if t0 is None:
        raise RuntimeError(f"baseline training exited before its first iteration: see {out / 'train.log'}")
    while time.time() - t0 < a.minutes * 60 and proc.poll() is None:
        time.sleep(2)
        for old in newest_checkpoints(ckpt_dir)[2:]:  # a checkpoint is ~35 MB; keep two
            old.unlink()
    os.killpg(proc.pid, signal.SIGTERM)
    log.write(proc.stdout.read())
    proc.wait()
    log.close()
    # The newest checkpoint may have been cut mid-write by the kill: take the newest that loads.
    for ckpt in newest_checkpoints(ckpt_dir):
        try:
            torch.load(ckpt, map_location="cpu")
            break
        except Exception:
            continue
    else:
        raise RuntimeError(f"no checkpoint in {ckpt_dir}")
    start = time.perf_counter()
    subprocess.run([str(c) for c in [python, ROOT / "benchmarks" / "maniskill_dp_eval.py", "--baseline-dir", src,
                    "--ckpt", ckpt, "--env-id", task, "--episodes", a.episodes, "--seed", a.seed,
                    "--out", out / "eval.json"]], env=ONE_THREAD, stdout=(out / "eval.log").open("w"),
                   stderr=subprocess.STDOUT, check=True)
    eval_seconds = time.perf_counter() - start
    e = json.loads((out / "eval.json").read_text())
    n = e["episodes"]
    return {"batch": batch, "params": e["params"], "iterations": int(ckpt.stem) + 1,
            "train_seconds": ckpt.stat().st_mtime - t0, "success_once": rate(e["success_once"], n),
            "success_at_end": rate(e["success_at_end"], n), "episodes": n, "eval_seconds": eval_seconds}


def fmt(r: dict) -> str:
    lo, hi = r["ci95"]
    return f"{r['rate']:.0%} [{lo:.0%}, {hi:.0%}]"


def table(rows: list[dict]) -> str:
    lines = ["| task | method | batch | params | train min | iterations | samples/s | success_once [ci95] | success_at_end [ci95] | eval episodes | eval time |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["task"]):
        sps = r["iterations"] * r["batch"] / r["train_seconds"]
        lines.append(f"| {r['task']} | {r['method']} | {r['batch']} | {r['params'] / 1e6:.2f}M | {r['train_seconds'] / 60:.1f} "
                     f"| {r['iterations']} | {sps:.0f} | {fmt(r['success_once'])} | {fmt(r['success_at_end'])} "
                     f"| {r['episodes']} | {r['eval_seconds'] / 60:.1f} min |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="training wall-clock budget per run")
    ap.add_argument("--tasks", nargs="+", default=TASKS)
    ap.add_argument("--datasets", nargs="+", help=f"one .h5 per task (default: datasets/<task>/{DEMOS}, recorded if missing)")
    ap.add_argument("--episodes", type=int, default=100, help="evaluation episodes per run")
    ap.add_argument("--seed", type=int, default=10_000, help="episode k of every evaluation is reset with seed + k")
    ap.add_argument("--baseline-batches", type=int, nargs="+", default=[64, 1024])
    ap.add_argument("--skip-teacher", action="store_true", help="run only the baseline rows (e.g. to add a batch size)")
    ap.add_argument("--maniskill-repo", default=UPSTREAM, help="ManiSkill git dir, checkout or URL")
    ap.add_argument("--cache", type=absolute, default=Path.home() / ".cache/robodistill/benchmarks/maniskill_dp")
    ap.add_argument("--out", type=absolute, default=ROOT / "runs" / "bench-teacher" / time.strftime("%Y-%m-%d_%H-%M-%S"))
    a = ap.parse_args()
    check_tasks("--tasks", a.tasks)
    counts(a, "--episodes")
    torch.set_num_threads(1)
    src, python = prepare_baseline(a.maniskill_repo, a.cache)
    datasets = dict(zip(a.tasks, a.datasets or [ROOT / "datasets" / t / DEMOS for t in a.tasks]))
    for task in a.tasks:
        datasets[task] = ensure_dataset(task, datasets[task])
    # Method by method across tasks: the teacher and the first baseline batch (64: the target's
    # comparison) finish on every task before the slow batch-1024 runs start.
    methods = [] if a.skip_teacher else [("robodistill teacher", "robodistill", 256)]
    methods += [("ManiSkill DP baseline", f"maniskill-b{b}", b) for b in a.baseline_batches]
    rows: list[dict] = []
    for method, slug, batch in methods:
        for task in a.tasks:
            out = a.out / task / slug
            print(f"[{time.strftime('%H:%M:%S')}] {task}: {method}, batch {batch}", flush=True)
            if slug == "robodistill":
                result = robodistill_run(task, datasets[task], a, out)
            else:
                # A checkpoint every ~15-25 s of one-thread training (3.4 s/iter at 1024, ~0.35 at 64).
                result = baseline_run(task, datasets[task], batch, max(1, 4096 // batch), src, python, a, out)
            rows.append({"task": task, "method": method, "dataset": datasets[task], **result})
            # Written after every run, so an interrupted benchmark keeps what it finished.
            a.out.mkdir(parents=True, exist_ok=True)
            (a.out / "teacher.json").write_text(json.dumps({"minutes": a.minutes, "rows": rows, "table": table(rows)}, indent=2))
    print(table(rows))
    print(f"raw numbers: {a.out / 'teacher.json'}")


if __name__ == "__main__":
    guarded(main)
