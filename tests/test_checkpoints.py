import os
import random

import numpy as np
import pytest
import torch

from robodistill import checkpoints
from robodistill.envs import EnvConfig, make_env
from robodistill.errors import CutShort, UserError
from robodistill.policies import load_policy


def test_roundtrip_keeps_tensors_config_and_rng(tmp_path):
    net = torch.nn.Linear(3, 2)
    path = checkpoints.save(tmp_path / "ckpt" / "last.pt", {
        "kind": "test", "config": {"lr": 1e-3, "dims": [3, 2]}, "step": 7,
        "model": net.state_dict(), "rng": checkpoints.rng_state(),
    })
    draws = (random.random(), np.random.rand(), torch.rand(2))
    loaded = checkpoints.load(path)
    assert loaded["step"] == 7 and loaded["config"] == {"lr": 1e-3, "dims": [3, 2]}
    torch.testing.assert_close(loaded["model"]["weight"], net.weight.detach())
    checkpoints.set_rng_state(loaded["rng"])
    again = (random.random(), np.random.rand(), torch.rand(2))
    assert draws[0] == again[0] and draws[1] == again[1] and torch.equal(draws[2], again[2])
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temp files left
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # readable as any file the user writes, not 0600


def test_failed_save_keeps_previous_file_and_leaves_no_temp(tmp_path):
    path = checkpoints.save(tmp_path / "last.pt", {"kind": "test", "step": 1})
    with pytest.raises(Exception):
        checkpoints.save(path, {"kind": "test", "step": 2, "bad": lambda: None})  # unpicklable
    assert checkpoints.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_checkpoint_the_disk_has_no_room_for_says_so_and_keeps_the_previous_one(tmp_path):
    # torch.save into a file that could not grow said "[enforce fail at inline_container.cc] unexpected pos"
    import resource

    checkpoints.save(tmp_path / "last.pt", {"w": torch.ones(10)})
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, hard))  # a full disk as one process meets it: writes fail (EFBIG)
    try:
        with pytest.raises(CutShort, match=r"could not write .*last.pt: File too large \(last.pt as it was is kept\); raise the"):
            checkpoints.save(tmp_path / "last.pt", {"w": torch.zeros(100_000)})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert checkpoints.load(tmp_path / "last.pt")["w"].tolist() == [1.0] * 10 and os.listdir(tmp_path) == ["last.pt"]


def test_save_removes_what_a_writer_killed_mid_write_left_and_only_that(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    left = tmp_path / f".last.pt.{dead}.tmp"  # a checkpoint's worth of disk, for every kill
    writing = tmp_path / f".last.pt.{os.getppid()}.tmp"  # a live process still writing it
    other = tmp_path / f".best.pt.{dead}.tmp"  # another file's: not this save's business
    for p in (left, writing, other):
        p.write_bytes(b"partial")
    checkpoints.save(tmp_path / "last.pt", {"kind": "test", "step": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([other.name, writing.name, "last.pt"])


def test_truncated_and_foreign_files_are_named_in_the_error(tmp_path):
    good = checkpoints.save(tmp_path / "good.pt", {"kind": "test", "model": torch.nn.Linear(64, 64).state_dict()})
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:200])
    with pytest.raises(UserError, match="cut.pt.*cannot be read"):
        checkpoints.load(cut)
    other = tmp_path / "demos.h5"  # another kind of file: one line, no torch unpickler text
    other.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(4000))
    with pytest.raises(UserError, match=r"^checkpoint '.*demos.h5' cannot be read: it is not a torch checkpoint, or it is truncated$"):
        checkpoints.load(other)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(1)}, foreign)
    with pytest.raises(UserError, match="foreign.pt' is not a robodistill checkpoint"):
        checkpoints.load(foreign)
    with pytest.raises(UserError, match="missing.pt' does not exist"):
        checkpoints.load(tmp_path / "missing.pt")
    from stable_baselines3 import PPO

    PPO("MlpPolicy", "Pendulum-v1", n_steps=64, device="cpu").save(tmp_path / "student.zip")
    with pytest.raises(UserError, match="student.zip' is a stable-baselines3 zip"):
        checkpoints.load(tmp_path / "student.zip")


def test_load_policy_refuses_non_policy_checkpoint_and_wrong_task(tmp_path):
    path = checkpoints.save(tmp_path / "trainer.pt", {"kind": "trainer-state"})
    with make_env(EnvConfig(task="PickCube-v1")) as env:
        with pytest.raises(UserError, match="holds a 'trainer-state', which is not a policy"):
            load_policy(str(path), env)
        with pytest.raises(UserError, match="PushCube expert"):
            load_policy("scripted", env)
        with pytest.raises(UserError, match="neither 'random', 'scripted', a bundle directory nor an existing checkpoint"):
            load_policy(str(tmp_path / "nope.pt"), env)


def test_a_run_stopped_by_minutes_says_how_far_its_learning_rate_schedule_decayed():
    from diffusers.optimization import get_scheduler

    from robodistill.training.runs import schedule_note

    assert schedule_note(12, 12, warmup=2) == ""
    note = schedule_note(3, 12, warmup=2)
    assert "25% of iterations=12" in note and "iterations=3 ends the schedule" in note
    # the rate the run stopped at, as diffusers' schedule set it
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=2, num_training_steps=12)
    for _ in range(3):
        optimizer.step()
        schedule.step()
    assert f"learning rate still at {schedule.get_last_lr()[0]:.0%} of its peak" in note
    assert "still at 50% of its peak" in schedule_note(1, 12, warmup=2)
