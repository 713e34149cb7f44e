"""RPD with an RGB teacher: how fast each kind of student trains, side by side on one core.

For one task and one RGB teacher checkpoint (a diffusion teacher trained on RGB demos, or the VLA),
`robodistill rpd` runs `--steps` env steps, one run after another, pinned to `--core`, one thread:

- rgb student: a CNN on the teacher's own camera observations, rendered at every env step;
- state student, teacher_obs_mode=rgb: an MLP on the simulator state; the teacher is shown images
  rendered from the student's stored states, only for the frames it is asked with;
- state PPO: the same MLP, teacher=none (no images at all): the ceiling.

Prints a table of training env steps per second (evaluation excluded, as `history.json` counts them)
and the ratio to the RGB student. No warm start: the warm start's teacher acts, and renders, every step.

    .venv/bin/python benchmarks/camera_teacher.py --teacher runs/train-teacher/<rgb run>/checkpoints/last.pt \\
        [--task PushCube-v1] [--control-mode pd_ee_delta_pose] [--image-size 64] [--steps 4000] [--core 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RD, absolute, check_tasks, counts, guarded  # noqa: E402
from robodistill.errors import UserError  # noqa: E402
from rpd import run, wait  # noqa: E402  (the same way of running pinned, single-thread jobs)

ROOT = Path(__file__).resolve().parent.parent
KINDS = {
    "rgb student": ["env.obs_mode=rgb"],
    "state student, teacher_obs_mode=rgb": ["env.obs_mode=state", "teacher_obs_mode=rgb"],
    "state PPO (teacher=none)": ["env.obs_mode=state", "teacher=none"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", type=absolute, required=True, help="an RGB teacher checkpoint (train-teacher env.obs_mode=rgb, or train-vla)")
    ap.add_argument("--task", default="PushCube-v1")
    ap.add_argument("--control-mode", default="pd_ee_delta_pose", help="the teacher's")
    ap.add_argument("--image-size", type=int, default=64, help="the teacher's")
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--core", type=int, default=0)
    ap.add_argument("--out", type=absolute, default=ROOT / "runs" / "bench-camera-teacher" / time.strftime("%Y-%m-%d_%H-%M-%S"))
    a = ap.parse_args()
    if not a.teacher.is_file():
        raise UserError(f"--teacher {a.teacher}: no such checkpoint")
    check_tasks("--task", [a.task])
    counts(a, "--image-size", "--steps")
    common = [f"env={a.task}", f"env.control_mode={a.control_mode}", f"env.image_size={a.image_size}", f"teacher={a.teacher}",
              f"total_steps={a.steps}", "eval_every=0", "eval_episodes=1", f"checkpoint_every={a.steps}", "progress=false"]
    speed = {}
    for i, (kind, args) in enumerate(KINDS.items()):
        run_dir = a.out / f"run{i}"
        log = run_dir / "run.log"
        wait(run([*RD, "rpd", *common, *args, f"hydra.run.dir={run_dir}"], log, a.core), log)
        speed[kind] = json.loads((run_dir / "history.json").read_text())[-1]["train_steps_per_second"]
        print(f"[{time.strftime('%H:%M:%S')}] {kind}: {speed[kind]:.1f} env steps/s", flush=True)
    base = speed["rgb student"]
    rows = [f"{a.task}, {a.image_size}px, {a.steps} env steps per run, core {a.core}, one thread",
            "| student | training env steps/s | vs rgb student |", "|---|---:|---:|"]
    rows += [f"| {kind} | {s:.1f} | {s / base:.2f}x |" for kind, s in speed.items()]
    print("\n".join(rows))
    (a.out / "camera_teacher.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "steps_per_second": speed}, indent=2))


if __name__ == "__main__":
    guarded(main)
