"""Data-parallel teacher training: one process on all cores vs `launcher=torchrun nproc=N` (one thread per rank).

Both train the same teacher on the same demos with the same global batch for the same number of
iterations, one after the other in this process's session (nothing else should run meanwhile),
`--repeats` times each, alternating. Prints a markdown table of training samples per second
(evaluation excluded; the trainer's own count) and the ratio DDP / one process, per denoiser.

    .venv/bin/python benchmarks/ddp.py --dataset <demos.h5> [--nproc 2] [--iterations 1500] [--denoisers mlp unet]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def train(dataset: Path, denoiser: str, iterations: int, batch: int, nproc: int | None, out: Path) -> float:
    args = [sys.executable, "-m", "robodistill.cli", "train-teacher", "env=PushCube-v1", f"dataset={dataset}",
            f"policy.denoiser={denoiser}", f"iterations={iterations}", f"batch_size={batch}", "eval_every=0",
            "eval_episodes=0", "val_fraction=0", f"checkpoint_every={iterations}", f"threads={nproc or os.cpu_count()}",
            f"hydra.run.dir={out}"]
    if nproc:
        args += ["launcher=torchrun", f"nproc={nproc}"]
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    return float(re.search(r"\(([\d.]+) samples/s\)", r.stdout).group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", type=Path, required=True, help="PushCube-v1 demos (state, pd_ee_delta_pos)")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=256, help="global batch (each rank takes batch / nproc)")
    ap.add_argument("--denoisers", nargs="+", default=["mlp", "unet"])
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    rows = ["| denoiser | global batch | one process, {c} threads (samples/s) | DDP {n} ranks x 1 thread (samples/s) | DDP / one |".format(
        c=os.cpu_count(), n=a.nproc), "|---|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as tmp:
        for denoiser in a.denoisers:
            iterations = a.iterations if denoiser == "mlp" else max(50, a.iterations // 20)  # the U-Net is ~25x slower per step
            one, ddp = [], []
            for i in range(a.repeats):
                one.append(train(a.dataset, denoiser, iterations, a.batch, None, Path(tmp) / f"{denoiser}-one-{i}"))
                ddp.append(train(a.dataset, denoiser, iterations, a.batch, a.nproc, Path(tmp) / f"{denoiser}-ddp-{i}"))
                print(f"{denoiser} repeat {i}: one {one[-1]:.0f}, ddp {ddp[-1]:.0f} samples/s", flush=True)
            rows.append(f"| {denoiser} | {a.batch} | {np.mean(one):.0f} ({', '.join(f'{x:.0f}' for x in one)}) | "
                        f"{np.mean(ddp):.0f} ({', '.join(f'{x:.0f}' for x in ddp)}) | {np.mean(ddp) / np.mean(one):.2f} |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
