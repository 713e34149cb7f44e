"""What every training command shares about its run: the device, and the checkpoint to resume."""

from __future__ import annotations

from pathlib import Path

import torch

from robodistill.errors import UserError


def pick_device(name: str) -> torch.device:
    """`auto`: CUDA where there is one, else the CPU; otherwise the named torch device."""
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def find_resume(resume: bool, resume_from: str | None, name: str, run_dir: Path, filename: str = "last.pt") -> Path | None:
    """The checkpoint a run continues from: `resume_from` (a run directory or a checkpoint file), or
    with `resume=true` the newest earlier run of the same command and `name` with checkpoints/<filename>."""
    if resume_from:
        path = Path(resume_from)
        path = path / "checkpoints" / filename if path.is_dir() else path
        if not path.is_file():
            raise UserError(f"resume_from={resume_from}: no checkpoint at {path}")
        return path
    if not resume:
        return None
    runs = sorted(p for p in run_dir.parent.glob(f"*-{name}") if p != run_dir and (p / "checkpoints" / filename).is_file())
    if not runs:
        raise UserError(f"resume=true: no earlier run named '{name}' with checkpoints/{filename} under {run_dir.parent}")
    return runs[-1] / "checkpoints" / filename
