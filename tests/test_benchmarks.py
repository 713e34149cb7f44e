"""The benchmark scripts as a user runs them: in their own process, from any directory, with tiny budgets."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def bench(script: str, *args: str, cwd: Path, timeout: int = 120, one_core: bool = False) -> subprocess.CompletedProcess:
    """The script in a session of its own: a failing test kills the `robodistill` children it started too.
    `one_core`: pinned to one of this process's cores, as by taskset."""
    cmd = [sys.executable, str(BENCHMARKS / script), *args]
    pin = (lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})) if one_core else None
    with subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                          preexec_fn=pin, env={**os.environ, "OMP_NUM_THREADS": "1"}) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_ddp_from_another_directory_on_one_core(tmp_path, pushcube_demos):
    for suffix in (".h5", ".json"):  # the suite's demos, under a name relative to this directory
        shutil.copy(pushcube_demos.with_suffix(suffix), (tmp_path / "demos").with_suffix(suffix))
    r = bench("ddp.py", "--dataset", "demos.h5", "--jobs", "teacher-mlp", "--iterations", "2", "--batch", "8",
              "--repeats", "1", "--nproc", "1", cwd=tmp_path, one_core=True)
    assert r.returncode == 0, r.stderr[-3000:]  # the relative --dataset found by its robodistill children
    assert "| teacher-mlp (samples/s) |" in r.stdout
    assert "| job | one process, 1 threads | 1 ranks x 1 thread |" in r.stdout  # the cores taskset left it


BAD_INPUT = {
    ("env_throughput.py", "--steps", "0"): "--steps must be >= 1, got 0",
    ("env_throughput.py", "--repeats", "0"): "--repeats must be >= 1, got 0",
    ("env_throughput.py", "--tasks", "PushCub-v1"): "unknown task 'PushCub-v1' (--tasks): did you mean --tasks=PushCube-v1?",
    ("agv.py", "--budget", "0", "--out", "out"): "--budget must be >= 2048, got 0",
    ("agv.py", "--eval-episodes", "0", "--out", "out"): "--eval-episodes must be >= 1, got 0",
    ("latency.py", "--task", "PushCube-v1=nope.pt"): "--task PushCube-v1=nope.pt: checkpoint 'nope.pt' does not exist",
    ("latency.py", "--task", "PushCube-v1=teacher.pt"): "has no consistency head: give `robodistill distill` outputs",
    ("serve.py", "--bundle", "nope"): "is not a bundle: it has no metadata.json",
    ("serve.py", "--bundle", "nope", "--requests", "0"): "--requests must be >= 1, got 0",
    ("rpd.py", "--tasks", "Nope-v1", "--out", "out"): "unknown task 'Nope-v1' (--tasks)",
    ("rpd.py", "--steps", "-5", "--out", "out"): "--steps must be >= 200, got -5",
    ("ddp.py", "--dataset", "teacher.pt", "--nproc", "0"): "--nproc must be >= 1, got 0",
}


@pytest.mark.parametrize("args", list(BAD_INPUT), ids=" ".join)
def test_bad_input_is_one_line_before_any_work(tmp_path, args):
    from robodistill import checkpoints

    checkpoints.save(tmp_path / "teacher.pt", {"policy": {}})  # a train-teacher output: no consistency head
    r = bench(*args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr[-3000:]
    assert BAD_INPUT[args] in r.stderr
    assert not (tmp_path / "out").exists()


def test_a_run_is_reused_only_with_the_settings_it_was_made_with(tmp_path):
    tiny = ["--seeds", "0", "--scenes", "simple_static", "--algos", "ppo", "--eval-episodes", "2", "--curve-episodes", "2",
            "--curve-points", "1", "--throughput-steps", "16", "--out", "out"]
    first = bench("agv.py", "--budget", "4096", *tiny, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "out" / "simple_static" / "ppo" / "seed0"
    other = bench("agv.py", "--budget", "8192", *tiny, cwd=tmp_path)
    assert other.returncode == 2 and other.stderr.count("\n") == 1, other.stderr[-3000:]
    assert f"error: {run_dir} holds a run made with --budget=4096, not --budget=8192: use another --out" in other.stderr
    same = bench("agv.py", "--budget", "4096", *tiny, cwd=tmp_path)
    assert same.returncode == 0, same.stderr[-3000:]
    assert f"reusing {run_dir}" in same.stdout
    assert json.loads((tmp_path / "out" / "results.json").read_text())["budget"] == 4096


def test_rl100_benchmark_refuses_a_finished_run_made_with_other_flags(tmp_path, monkeypatch):
    """In process: an RL-100 grid takes hours; what a finished run leaves is its teacher's last.pt and its report.json."""
    import argparse

    from robodistill.errors import UserError

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from rl100 import check_reuse

    a = argparse.Namespace(demos=100, dataset={}, init={}, teacher_minutes=10.0, max_episode_steps=100, episodes=200,
                           gate_episodes=50, online_steps=60_000, overrides=["offline.gate=both"], out=tmp_path)
    check_reuse("PushCube-v1", a)  # nothing made yet: the settings are recorded
    run = tmp_path / "PushCube-v1"
    (run / "teacher" / "checkpoints").mkdir(parents=True)
    (run / "teacher" / "checkpoints" / "last.pt").touch()
    (run / "rl100" / "report.json").write_text("{}")
    check_reuse("PushCube-v1", a)  # the same flags: reused
    with pytest.raises(UserError, match=f"{run / 'rl100'} holds a run made with online.env_steps=60000, not online.env_steps=30000"):
        check_reuse("PushCube-v1", argparse.Namespace(**{**vars(a), "online_steps": 30_000}))
    with pytest.raises(UserError, match=f"{run / 'teacher'} holds a run made with minutes=10.0, not minutes=5.0"):
        check_reuse("PushCube-v1", argparse.Namespace(**{**vars(a), "teacher_minutes": 5.0}))


def test_children_take_relative_paths_from_the_users_directory(tmp_path, pushcube_demos, monkeypatch):
    # A relative path in pass-through overrides (`-- dataset=demos.h5`, `--rpd teacher=...`) means what it would on
    # the command line; the children once ran in the repository root, where it named nothing.
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.chdir(tmp_path)
    import rl100
    import rpd
    from common import RD

    shutil.copy(pushcube_demos, tmp_path / "demos.h5")
    shutil.copy(pushcube_demos.with_suffix(".json"), tmp_path / "demos.json")
    rl100.run([*RD, "dataset", "info", "demos.h5"], tmp_path / "rl100.log", core=0)
    rpd.wait(rpd.run([*RD, "dataset", "info", "demos.h5"], tmp_path / "rpd.log"), tmp_path / "rpd.log")
    assert "file          demos.h5" in (tmp_path / "rl100.log").read_text() and "episodes      3" in (tmp_path / "rpd.log").read_text()


def test_a_child_that_refuses_its_input_ends_the_script_in_its_line_and_stops_the_others(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import rpd
    from common import RD

    from robodistill.errors import UserError

    jobs = [(name, tmp_path / name, [*RD, "rpd", "env=PushCube-v1", "teacher=none", *extra, f"hydra.run.dir={tmp_path / name}"])
            for name, extra in [("long", ["total_steps=1000000"]), ("bad", ["n_steps=0"])]]
    with pytest.raises(UserError, match=rf"total_steps and n_steps must be >= 1 .*\(log: {tmp_path / 'bad' / 'run.log'}\)"):
        rpd.run_on_cores(jobs, [0, 1], on_done=lambda *_: pytest.fail("no job finishes"))
    assert subprocess.run(["pgrep", "-f", f"hydra.run.dir={tmp_path / 'long'}"]).returncode == 1  # not left running


def test_a_teacher_killed_part_way_is_continued_not_reported_as_finished(tmp_path, pushcube_demos, cli, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from common import RD, trained

    run = cli("train-teacher", "env=PushCube-v1", f"dataset={pushcube_demos}", "iterations=20", "minutes=10", "eval_every=0",
              "eval_episodes=0", "val_fraction=0", f"hydra.run.dir={tmp_path / 'teacher'}")
    assert run.returncode == 0, run.stderr[-2000:]
    ckpt = tmp_path / "teacher" / "checkpoints" / "last.pt"

    def command(iterations: int, minutes: str = "10") -> list:
        return [*RD, "train-teacher", "env=PushCube-v1", f"iterations={iterations}", f"minutes={minutes}", f"hydra.run.dir={tmp_path}"]

    assert trained(ckpt, command(20))
    assert not trained(ckpt, command(40)) and not trained(ckpt, command(40, "null"))  # as if killed at iteration 20 of 40
    assert trained(ckpt, command(40, "0.0001"))  # its minutes used up


def test_a_seed_is_pooled_once_and_the_header_names_what_ran(tmp_path):
    r = bench("rpd.py", "--seeds", "0", "0", "--out", "out", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr == "error: --seeds gives 0 more than once: give each once\n", r.stderr[-3000:]
    tiny = ["--scenes", "simple_static", "--budget", "2048", "--eval-episodes", "1", "--curve-episodes", "1",
            "--curve-points", "1", "--throughput-steps", "16", "--out", "out"]
    r = bench("agv.py", "--seeds", "0", "0", *tiny, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr == "error: --seeds gives 0 more than once: give each once\n", r.stderr[-3000:]
    r = bench("agv.py", "--seeds", "0", "--algos", "ppo", *tiny, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "\nPPO, 2048 env steps per run" in r.stdout


def test_help_describes_the_script(tmp_path):
    r = bench("rl100.py", "--help", cwd=tmp_path)
    assert r.returncode == 0 and "how often the OPE gate let a worse policy through." in " ".join(r.stdout.split()), r.stdout
    r = bench("maniskill_dp_eval.py", "--help", cwd=tmp_path)
    assert r.returncode == 0 and "Evaluate one checkpoint of ManiSkill's diffusion-policy baseline" in " ".join(r.stdout.split()), r.stdout


def test_env_throughput_table_fits_long_task_names(tmp_path):
    r = bench("env_throughput.py", "--steps", "2", "--repeats", "1", "--tasks", "LiftPegUpright-v1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    header, rule, row = r.stdout.strip().splitlines()[-3:]
    assert len(header) == len(rule) == len(row), r.stdout


def test_serve_keeps_its_servers_run_dirs_to_itself(tmp_path):
    from dataclasses import asdict

    import torch

    from robodistill import checkpoints
    from robodistill.deploy.export import ExportConfig, export
    from robodistill.envs import EnvConfig
    from robodistill.policies.diffusion import DiffusionConfig, DiffusionPolicy
    from robodistill.policies.diffusion.consistency import ConsistencyHead

    policy = DiffusionPolicy(DiffusionConfig(pred_horizon=8, act_horizon=4, mlp_hidden=[16]), 35, 4, -torch.ones(4), torch.ones(4))
    head = ConsistencyHead.from_denoiser(policy.denoiser)
    checkpoints.save(tmp_path / "last.pt", {"kind": "diffusion", "policy": policy.spec(), "env": asdict(EnvConfig()),
                                            "ema": policy.state_dict(), "consistency": {"weights": head.state_dict()}})
    bundle, _ = export(ExportConfig(ckpt=str(tmp_path / "last.pt"), sampler="consistency", steps=1), tmp_path / "bundle")
    shared = Path("/tmp/robodistill-bench-serve/.hydra/config.yaml")  # where every run used to put its servers' runs
    before = shared.stat().st_mtime_ns if shared.exists() else None
    (tmp_path / "tmp").mkdir()
    r = subprocess.run([sys.executable, str(BENCHMARKS / "serve.py"), "--bundle", str(bundle), "--requests", "2", "--clients", "1"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120, env={**os.environ, "TMPDIR": str(tmp_path / "tmp")})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "no request dropped" in r.stdout
    assert (shared.stat().st_mtime_ns if shared.exists() else None) == before
    assert not list((tmp_path / "tmp").glob("robodistill-bench-serve*"))  # each run's own, removed
