import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# One thread per process, as in real runs: torch's default makes ManiSkill stepping erratic on 2 cores.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROBODISTILL = [sys.executable, "-m", "robodistill.cli"]


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `robodistill ...` as a user would, in its own process."""
    return subprocess.run(
        [*ROBODISTILL, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def cli(tmp_path):
    return lambda *args, **kw: run_cli(*args, cwd=tmp_path, **kw)
