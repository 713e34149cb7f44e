import io
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from openpi_client.base_policy import BasePolicy

from robodistill.policies.bundle import Bundle

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


def run_cli_here(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`robodistill ...` through the same entry point, in this process: for the many bad-input cases, which end
    before any work, so that each does not pay a fresh interpreter's ~4 s of importing torch and ManiSkill. An
    exception that escapes shows up as the traceback a user would see."""
    out, err, argv, here = io.StringIO(), io.StringIO(), sys.argv[:], os.getcwd()
    code = 0
    try:
        os.chdir(cwd)
        with redirect_stdout(out), redirect_stderr(err):
            from robodistill.cli import main

            main(list(args))
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    except BaseException:  # noqa: BLE001 - reported as the process would report it
        err.write(traceback.format_exc())
        code = 1
    finally:
        os.chdir(here)
        sys.argv = argv
    return subprocess.CompletedProcess(["robodistill", *args], code, out.getvalue(), err.getvalue())


def relabeled_demos(demos: Path, folder: Path, first_seed: int, name: str | None = None) -> Path:
    """A copy of the demos whose .json says they were planned from `first_seed` on, as `robodistill demos seed=<it>` records."""
    folder.mkdir(parents=True)
    copy = folder / (name or demos.name)
    shutil.copy(demos, copy)
    meta = json.loads(demos.with_suffix(".json").read_text())
    for k, row in enumerate(meta["episodes"]):
        row["episode_seed"] = first_seed + k
    copy.with_suffix(".json").write_text(json.dumps(meta))
    return copy


@contextmanager
def disk_full_past(size: int):
    """A full disk as one process meets it: writes past `size` bytes of a file fail (EFBIG, as ENOSPC would)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


@pytest.fixture
def cli_here(tmp_path):
    return lambda *args: run_cli_here(*args, cwd=tmp_path)


@pytest.fixture(autouse=True)
def sb3_logs_in_tmp(tmp_path, monkeypatch):
    """SB3 models learning without a log folder create an empty /tmp/SB3-<date> each: keep them in the test's."""
    monkeypatch.setenv("SB3_LOGDIR", str(tmp_path / "sb3"))


@pytest.fixture
def cli(tmp_path):
    return lambda *args, **kw: run_cli(*args, cwd=tmp_path, **kw)


def once_per_run(tmp_path_factory, name: str, make):
    """`make(folder)`'s result (JSON: paths as strings), made once per test run. Under xdist each worker has its own
    session, so every worker given a file that uses a session fixture made it again (the RGB demos about a minute,
    the PushCube ones 20 s): the first worker makes it, holding a lock in the run's folder, the others wait and read it."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return make(tmp_path_factory.mktemp(name))
    import fcntl
    import json

    run = tmp_path_factory.getbasetemp().parent  # the run's own folder, above each worker's basetemp
    made = run / f"{name}.json"
    with open(run / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when `make` fails
        if made.exists():
            return json.loads(made.read_text())
        made.write_text(json.dumps(make(tmp_path_factory.mktemp(name))))
        return json.loads(made.read_text())  # as the other workers read it


@pytest.fixture(scope="session")
def pushcube_demos(tmp_path_factory) -> Path:
    """3 PushCube demos, state + pd_ee_delta_pos, made by the CLI as a user would."""

    def make(root: Path) -> str:
        r = run_cli("demos", "env=PushCube-v1", "n=3", "seed=10", f"out={root / 'ds'}", cwd=root)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "3/3 demonstrations" in r.stdout and "failed plans, retried with new seeds: 0)" in r.stdout
        return str(root / "ds" / "mp_n3_seed10.state.pd_ee_delta_pos.h5")

    return Path(once_per_run(tmp_path_factory, "pushcube", make))


@pytest.fixture(scope="session")
def pickcube_rgb_demos(tmp_path_factory) -> dict:
    """2 PickCube demos with 48x48 RGB observations (made in-process): a second task, a second obs mode."""
    from robodistill.demos import DemosConfig, generate
    from robodistill.envs import EnvConfig

    return once_per_run(tmp_path_factory, "pickcube_rgb", lambda out: generate(
        DemosConfig(env=EnvConfig(task="PickCube-v1", obs_mode="rgb", image_size=48), n=2, seed=0, out=str(out))))


@pytest.fixture(scope="session")
def pickcube_rgb_teacher(tmp_path_factory, pickcube_rgb_demos) -> Path:
    """A 4-iteration RGB teacher (MLP denoiser, distilled head) of the 48 px PickCube demos: a checkpoint that sees images."""
    return Path(once_per_run(tmp_path_factory, "pickcube_rgb_teacher", lambda root: str(_rgb_teacher(root, pickcube_rgb_demos))))


def _rgb_teacher(root: Path, pickcube_rgb_demos: dict) -> Path:
    from robodistill.envs import EnvConfig
    from robodistill.training.distill import DistillConfig
    from robodistill.training.distill import train as distill
    from robodistill.training.teacher import TrainTeacherConfig, train

    train(TrainTeacherConfig(env=EnvConfig(task="PickCube-v1", obs_mode="rgb", image_size=48), dataset=str(pickcube_rgb_demos["path"]),
                             iterations=4, batch_size=8, eval_every=0, eval_episodes=0, val_fraction=0, threads=1), root / "teacher")
    distill(DistillConfig(teacher=str(root / "teacher" / "checkpoints" / "last.pt"), iterations=2, batch_size=8, eval_episodes=0,
                          threads=1), root / "distill")
    return root / "distill" / "checkpoints" / "last.pt"


class SlowPolicy(BasePolicy):
    """A bundle behind a slow link: every answer takes `delay` seconds."""

    def __init__(self, bundle: Bundle, delay: float):
        self.bundle, self.delay, self.rng = bundle, delay, np.random.default_rng(0)

    def infer(self, obs: dict) -> dict:
        time.sleep(self.delay)
        arrays = {k: v[None] for k, v in obs.items()}
        return {"actions": self.bundle.infer(arrays, self.bundle.noise(1, self.rng))[0]}
