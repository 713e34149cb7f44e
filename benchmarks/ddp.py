"""Data-parallel training: one process on all cores vs `launcher=torchrun nproc=N` (one thread per rank).

For each job, both runs do the same work (the same global batch, or for the PPO student the same
envs and rollout in all, split over the ranks) one after the other in this process's session
(nothing else should run meanwhile), `--repeats` times each, alternating. Prints a markdown table of
training throughput (evaluation excluded; the trainer's own count) and the ratio DDP / one process.

Jobs: `teacher-mlp`, `teacher-unet` (train-teacher, samples/s), `distill` (the regression
consistency head of the teacher-mlp run, samples/s), `rpd` (the PPO student, env steps/s).

    .venv/bin/python benchmarks/ddp.py --dataset <PushCube-v1 demos.h5> [--nproc 2] [--jobs teacher-mlp distill rpd]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from common import absolute, counts, guarded
from robodistill.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
JOBS = ("teacher-mlp", "teacher-unet", "distill", "rpd")
UNIT = {"rpd": "env steps/s"}
CORES = len(os.sched_getaffinity(0))  # those this process may run on (taskset), not the machine's


def command(job: str, a: argparse.Namespace, nproc: int | None, out: Path, teacher: Path) -> list[str]:
    ranks = nproc or 1
    threads = f"threads={nproc or CORES}"
    if job.startswith("teacher"):
        denoiser = job.split("-")[1]
        iterations = a.iterations if denoiser == "mlp" else max(50, a.iterations // 20)  # the U-Net is ~25x slower per step
        return ["train-teacher", "env=PushCube-v1", f"dataset={a.dataset}", f"policy.denoiser={denoiser}",
                f"iterations={iterations}", f"batch_size={a.batch}", "eval_every=0", "eval_episodes=0", "val_fraction=0",
                f"checkpoint_every={iterations}", threads]
    if job == "distill":
        return ["distill", f"teacher={teacher}", f"iterations={a.iterations // 5}", f"batch_size={a.batch}",
                "eval_episodes=0", f"checkpoint_every={a.iterations}", threads]
    # The same 8 envs and 800-step rollouts in all: env.num_envs, n_steps and batch_size are per rank.
    return ["rpd", "env=PushCube-v1", f"env.num_envs={8 // ranks}", "n_steps=100", f"batch_size={100 // ranks}",
            f"total_steps={a.rpd_steps}", "eval_every=0", "eval_episodes=1", f"checkpoint_every={a.rpd_steps}",
            "progress=false", threads]


def throughput(job: str, out: Path, stdout: str) -> float:
    if job.startswith("teacher"):
        return float(re.search(r"\(([\d.]+) samples/s\)", stdout).group(1))
    if job == "distill":
        return json.loads((out / "result.json").read_text())["samples_per_second"]
    return json.loads((out / "history.json").read_text())[-1]["train_steps_per_second"]


def run(job: str, a: argparse.Namespace, nproc: int | None, out: Path, teacher: Path) -> float:
    args = [sys.executable, "-m", "robodistill.cli", *command(job, a, nproc, out, teacher), f"hydra.run.dir={out}"]
    if nproc:
        args += ["launcher=torchrun", f"nproc={nproc}"]
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    return throughput(job, out, r.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", type=absolute, required=True, help="PushCube-v1 demos (state, pd_ee_delta_pos)")
    ap.add_argument("--nproc", type=int, default=2, help="ranks of the torchrun runs (the other run: one process)")
    ap.add_argument("--iterations", type=int, default=1500, help="teacher-mlp iterations (distill: a fifth)")
    ap.add_argument("--batch", type=int, default=256, help="global batch (each rank takes batch / nproc)")
    ap.add_argument("--rpd-steps", type=int, default=16_000, help="env steps of each PPO student run")
    ap.add_argument("--jobs", nargs="+", default=list(JOBS), choices=JOBS)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    if not a.dataset.is_file():
        raise UserError(f"--dataset {a.dataset}: no such file (make one with `robodistill demos env=PushCube-v1`)")
    counts(a, "--nproc", "--iterations", "--batch", "--rpd-steps", "--repeats")
    rows = ["| job | one process, {c} threads | {n} ranks x 1 thread | ranks / one |".format(c=CORES, n=a.nproc),
            "|---|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as tmp:
        teacher = Path(tmp) / "teacher-mlp-one-0" / "checkpoints" / "last.pt"
        if "distill" in a.jobs and "teacher-mlp" not in a.jobs:
            raise UserError("--jobs distill needs teacher-mlp before it (its teacher)")
        for job in a.jobs:
            one, ddp = [], []
            for i in range(a.repeats):
                one.append(run(job, a, None, Path(tmp) / f"{job}-one-{i}", teacher))
                ddp.append(run(job, a, a.nproc, Path(tmp) / f"{job}-ddp-{i}", teacher))
                print(f"{job} repeat {i}: one {one[-1]:.0f}, {a.nproc} ranks {ddp[-1]:.0f} {UNIT.get(job, 'samples/s')}", flush=True)
            unit = UNIT.get(job, "samples/s")
            rows.append(f"| {job} ({unit}) | {np.mean(one):.0f} ({', '.join(f'{x:.0f}' for x in one)}) | "
                        f"{np.mean(ddp):.0f} ({', '.join(f'{x:.0f}' for x in ddp)}) | {np.mean(ddp) / np.mean(one):.2f} |")
    print("\n".join(rows))


if __name__ == "__main__":
    guarded(main)
