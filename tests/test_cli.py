import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROBODISTILL


def test_help_lists_commands_and_command_help_shows_config(cli):
    top = cli("--help")
    assert top.returncode == 0 and "eval" in top.stdout and "usage: robodistill" in top.stdout
    sub = cli("eval", "--help")
    assert sub.returncode == 0
    assert "env: LiftPegUpright-v1" in sub.stdout and "episodes: 10" in sub.stdout and "control_mode: pd_ee_delta_pos" in sub.stdout
    export = cli("export", "--help")  # only the groups a command has: export has no env
    assert export.returncode == 0 and "format: onnx" in export.stdout
    assert "env:" not in export.stdout and "schema" not in export.stdout


def test_eval_writes_run_dir_eval_json_and_video(cli, tmp_path):
    r = cli("eval", "env=PushCube-v1", "policy=scripted", "episodes=2", "seed=3", "video=true", "video_episodes=1")
    assert r.returncode == 0, r.stderr
    for word in ("success_once", "success_at_end", "return", "episode len", "95% interval"):
        assert word in r.stdout
    (run,) = (tmp_path / "runs" / "eval").iterdir()
    assert run.name.endswith("-PushCube-v1")
    report = json.loads((run / "eval.json").read_text())
    assert [e["seed"] for e in report["episodes"]] == [3, 4]
    assert report["summary"]["success_once"]["count"] == 2
    lo, hi = report["summary"]["success_once"]["ci95"]
    assert 0.3 < lo < 0.4 and hi == 1.0
    assert (run / "videos" / "episode_000.mp4").stat().st_size > 1000
    assert "policy: scripted" in (run / ".hydra" / "config.yaml").read_text()
    assert not list(run.glob("*.log"))  # log records go to the console, not also to an (empty) file per run


def test_bad_input_is_one_clear_line(cli, cli_here, tmp_path):
    cases = {
        ("env.task=NoSuchTask-v9",): "Supported tasks: PushCube-v1",
        ("env=NoSuchTask-v9",): "env=NoSuchTask-v9: there is no such env config. Choose one of: LiftPegUpright-v1",
        ("env=PushCub-v1",): "env=PushCub-v1: there is no such env config (did you mean env=PushCube-v1?). Choose one of:",
        ("env=null",): "env=null: env is a config group, not a value: choose one of LiftPegUpright-v1, ",  # was hydra's ValueError traceback
        ("env.task=PickCub-v1",): "unknown task 'PickCub-v1' (env.task): did you mean env.task=PickCube-v1? Supported tasks: PushCube-v1",
        ("env.control_mode=teleport",): "Valid: pd_joint_delta_pos",
        ("episodes=many",): "episodes=many: Value 'many' of type 'str' could not be converted to Integer",
        ("video=maybe",): "video=maybe: Value 'maybe' is not a valid bool",
        ("policy=missing.pt",): "neither 'random', 'scripted', a bundle directory nor an existing checkpoint",
        ("policy=",): "policy= is empty: give random, scripted, an export bundle directory or a checkpoint file",  # not "a folder"
        ("env.max_episode_steps=0",): "env.max_episode_steps must be >= 1",
        ("env.obs_mode=rgb", "env.image_size=0"): "env.image_size must be >= 1",
        ("seed=-1",): "seed must be >= 0",
        ("video=true", "video_episodes=0"): "video_episodes=0 must be >= 1 with video=true",  # filmed nothing, without a word
        ("episdoes=1",): "has no field episdoes (did you mean episodes=?)",
        ("+episdoes=1",): "has no field episdoes (did you mean episodes=?)",  # hydra itself would accept and ignore it
    }
    for args, message in cases.items():
        r = cli_here("eval", *args, "episodes=1")
        assert r.returncode == 2, (args, r.stderr)
        assert message in r.stderr and r.stderr.count("\n") == 1, (args, r.stderr)
    # one thing has one name per command: another command's name for it points at this one's
    r = cli_here("export", "policy=x.pt")
    assert r.returncode == 2 and "has no field policy (did you mean ckpt=?)" in r.stderr, r.stderr
    r = cli("evaluate")  # these two in a process of their own, as a user runs them
    assert r.returncode == 2 and "unknown command 'evaluate'" in r.stderr
    r = cli("eval", "episodes=1", "env.tsk=PushCube-v1")
    assert r.returncode == 2 and r.stderr.startswith("error: env.tsk=PushCube-v1:") and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "runs" / "eval").exists()  # no empty runs left, nor the folder made for them
    # summary over a runs folder with a stray file and a run whose JSON is not what the command writes
    (tmp_path / "runs" / "demos" / "x").mkdir(parents=True)
    (tmp_path / "runs" / "demos" / "x" / "demos.json").write_text("[1]")
    (tmp_path / "runs" / "demos" / "notes.txt").write_text("")
    r = cli_here("summary")
    assert r.returncode == 0 and r.stdout.splitlines()[-1].split() == ["demos", "x", "(incomplete", "run)"], r.stdout + r.stderr
    assert r.stdout.splitlines()[:2] == ["command  run  result", "-------  ---  ------"], r.stdout  # columns as wide as their names


def test_ctrl_c_ends_in_one_line_that_says_how_to_continue(tmp_path):
    def interrupt(when: str, *args: str) -> str:
        proc = subprocess.Popen([*ROBODISTILL, "rpd", "teacher=scripted", "total_steps=10000000", "progress=false", *args],
                                cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while time.time() < deadline and not list((tmp_path / "runs" / "rpd").glob(when)):
            time.sleep(0.1)
        time.sleep(1)  # into the command's own work
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
        return err.strip().splitlines()[-1]

    # Before its first checkpoint there is nothing to continue from, and the run says so.
    assert interrupt("*/.hydra/config.yaml", "name=early") == (
        "interrupted: it stopped before its first checkpoint, so there is nothing to resume; the same command starts it again")
    assert interrupt("*-late/checkpoints/last.zip", "name=late", "n_steps=16", "checkpoint_every=16", "eval_every=0") == (
        "interrupted: the run keeps its last checkpoint; the same command with resume=true continues it")
    # The same command again would start from resume_from's checkpoint, not from the one this run wrote.
    (late,) = (tmp_path / "runs" / "rpd").glob("*-late")
    assert interrupt("2099-*/.hydra/config.yaml", f"resume_from={late}", "hydra.run.dir=runs/rpd/2099-01-01_00-00-00-late") == (
        "interrupted: the run keeps its last checkpoint; resume=true name=late in place of resume_from= continues it")


def test_the_precheck_leaves_to_hydra_what_only_hydra_composes(cli_here, tmp_path):
    from robodistill.cli import precheckable

    assert precheckable(["episodes=2", "--cfg", "job", "~video", "launcher=torchrun", "nproc=2", "hydra.run.dir=x"]) == [
        "episodes=2", "~video", "hydra.run.dir=x"]
    for args in (["--config-name", "mine"], ["--config-path=cd"]):
        assert precheckable(args) is None, args
    (tmp_path / "cd" / "env").mkdir(parents=True)  # a user's own env config, found only through --config-dir
    (tmp_path / "cd" / "env" / "mine.yaml").write_text("task: PullCube-v1\n")
    r = cli_here("eval", "--config-dir", str(tmp_path / "cd"), "env=mine", "--cfg", "job")
    assert r.returncode == 0 and "task: PullCube-v1" in r.stdout, r.stdout + r.stderr


def test_an_experiment_file_in_the_users_own_folder_runs_with_plus_experiment(cli_here, tmp_path):
    (tmp_path / "mine" / "experiment").mkdir(parents=True)  # the diffusion_policy habit: one file per experiment
    (tmp_path / "mine" / "experiment" / "quick.yaml").write_text("# @package _global_\nepisodes: 3\npolicy: scripted\nname: quick\n")
    r = cli_here("eval", "--config-dir", str(tmp_path / "mine"), "+experiment=quick", "seed=4", "--cfg", "job")
    assert r.returncode == 0 and "episodes: 3\n" in r.stdout and "name: quick" in r.stdout and "seed: 4" in r.stdout, r.stdout + r.stderr
    # was "has no field experiment"; a misspelt experiment and a bad value beside one are a line each, as without one
    for args, message in ((["+experiment=quik"], "error: experiment=quik: there is no such experiment config (did you mean experiment=quick?)"),
                          (["+experiment=quick", "episodes=abc"], "error: episodes=abc: Value 'abc' of type 'str' could not be converted")):
        r = cli_here("eval", f"--config-dir={tmp_path / 'mine'}", *args)
        assert r.returncode == 2 and r.stderr.startswith(message) and r.stderr.count("\n") == 1, (args, r.stderr)
    r = cli_here("eval", "+experiment=quick")  # without the folder that holds it, not a group: not accepted and ignored
    assert r.returncode == 2 and "has no field experiment" in r.stderr, r.stderr


def test_a_run_is_reproduced_from_its_saved_config_into_runs_of_its_command(cli_here, tmp_path):
    r = cli_here("eval", "policy=random", "episodes=1", "env.max_episode_steps=5", "seed=3")
    assert r.returncode == 0, r.stderr[-2000:]
    (first,) = (tmp_path / "runs" / "eval").iterdir()
    # was a run in outputs/<date>/<time>/ (which neither summary nor resume=true looks in), its values untyped:
    # episodes=abc a TypeError traceback, video=maybe a video recorded
    again = cli_here("eval", "--config-path", str(first / ".hydra"), "--config-name", "config", "seed=9")
    assert again.returncode == 0 and not (tmp_path / "outputs").exists(), again.stderr[-2000:]
    (second,) = [p for p in (tmp_path / "runs" / "eval").iterdir() if p != first]
    assert second.name.endswith("-PushCube-v1") and not list(second.glob("*.log"))
    report = json.loads((second / "eval.json").read_text())
    assert report["seed"] == 9 and report["summary"]["mean_episode_len"] == 5
    for arg, message in (("episodes=abc", "error: episodes=abc: Value 'abc' of type 'str' could not be converted to Integer"),
                         ("video=maybe", "error: video=maybe: Value 'maybe' is not a valid bool")):
        r = cli_here("eval", "--config-path", str(first / ".hydra"), "--config-name", "config", arg)
        assert r.returncode == 2 and r.stderr.startswith(message) and r.stderr.count("\n") == 1, (arg, r.stderr[-2000:])
    # a primary config of the user's that builds on the command's lands with the command's runs too (not in runs/quick)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "quick.yaml").write_text("defaults:\n  - eval\n  - _self_\nepisodes: 1\nenv:\n  max_episode_steps: 5\nname: quick\n")
    r = cli_here("eval", "--config-dir", str(tmp_path / "mine"), "--config-name", "quick")
    assert r.returncode == 0 and [p.name for p in (tmp_path / "runs").iterdir()] == ["eval"], r.stderr[-2000:]
    assert len(list((tmp_path / "runs" / "eval").glob("*-quick/eval.json"))) == 1


def test_an_interrupt_that_a_binding_reports_as_another_error_still_ends_as_interrupted(monkeypatch, capsys):
    from robodistill import cli as entry

    def interrupted_in_a_binding(cfg):  # pybind11 turns an interrupt during argument conversion into this
        raise TypeError("compute_inverse_kinematics(): incompatible function arguments")

    with pytest.raises(TypeError):  # without a signal it is a bug, and shows as one
        entry._guarded(interrupted_in_a_binding, "eval")(None)
    monkeypatch.setattr(entry, "_signals", [signal.SIGTERM])
    with pytest.raises(SystemExit) as stop:
        entry._guarded(interrupted_in_a_binding, "eval")(None)
    assert stop.value.code == 130 and capsys.readouterr().err == "interrupted\n"

    def interrupted_in_training(cfg):
        from tqdm import tqdm

        bar = tqdm(total=10, desc="train")  # left open, as training leaves it when stopped
        bar.update(5)
        raise KeyboardInterrupt

    with pytest.raises(SystemExit):
        entry._guarded(interrupted_in_training, "eval")(None)
    said = capsys.readouterr().err
    assert said.splitlines()[-1] == "interrupted" and "train:  50%" in said, said  # a line of its own, not glued to the bar


def test_missing_vulkan_device_names_the_fix(cli):
    r = cli("eval", "episodes=1", env={"VK_ICD_FILENAMES": "/nonexistent/icd.json"})
    assert r.returncode == 2
    assert "no Vulkan device" in r.stderr and "make setup" in r.stderr


@pytest.mark.parametrize("launcher", [[], ["hydra/launcher=submitit_local"]], ids=["basic", "submitit_local"])
def test_multirun_sweeps_seeds_into_one_directory(cli, cli_here, tmp_path, launcher):
    # submitit_local runs each job as its own process the way submitit_slurm submits them to Slurm.
    r = cli("eval", "-m", *launcher, "seed=0,1", "policy=random", "episodes=1")
    assert r.returncode == 0, r.stderr[-3000:]
    (sweep,) = (tmp_path / "runs" / "eval").glob("*-multirun")
    seeds = [json.loads((sweep / str(i) / "eval.json").read_text())["seed"] for i in (0, 1)]
    assert seeds == [0, 1]
    table = cli_here("summary")
    # each job with the override it ran with, as plot's legend has them
    assert table.returncode == 0 and f"{sweep.name}/0 seed=0 " in table.stdout and f"{sweep.name}/1 seed=1 " in table.stdout, table.stdout
    assert "incomplete" not in table.stdout and table.stdout.count("/1) (random)") == 2  # each names its policy
    # by the name its jobs ran with (eval's default, ${env.task}), though the sweep's directory is <time>-multirun
    assert cli_here("summary", "--name", "PushCube-v1").stdout == table.stdout and cli_here("summary", "--name", "other").returncode == 2
    from robodistill.curves import labels
    from robodistill.summary import jobs

    assert labels(jobs(sweep)) == ["seed=0", "seed=1"]  # a plot's legend: what the jobs differ in


def test_a_sweep_that_stops_in_its_first_job_leaves_no_directory(cli, tmp_path):
    r = cli("eval", "-m", "seed=0,1", "policy=nothing.pt")
    assert r.returncode == 2 and "policy 'nothing.pt' is neither" in r.stderr, r.stderr
    assert not (tmp_path / "runs" / "eval").exists()  # no sweep directory holding only its multirun.yaml


def test_a_bad_value_anywhere_in_a_sweep_is_one_line_before_its_first_job(cli_here, tmp_path):
    # was hydra's "Error merging override" in six lines, after the jobs before it had run
    for args, message in ((["seed=0,x"], "error: seed=x: Value 'x' of type 'str' could not be converted to Integer"),
                          (["env=PushCube-v1,PickCub-v1"], "error: env=PickCub-v1: there is no such env config (did you mean env=PickCube-v1?)"),
                          (["seed=0,1", "episodes=abc"], "error: episodes=abc: Value 'abc'")):
        r = cli_here("eval", "-m", *args, "policy=random")
        assert r.returncode == 2 and r.stderr.startswith(message) and r.stderr.count("\n") == 1, (args, r.stderr[-2000:])
    assert not (tmp_path / "runs").exists()


def test_a_submitit_job_that_stops_on_bad_input_is_its_one_line(cli, tmp_path):
    r = cli("eval", "-m", "hydra/launcher=submitit_local", "seed=0,1", "policy=nothing.pt")
    assert r.returncode == 2 and r.stderr.startswith("error: policy 'nothing.pt' is neither") and r.stderr.count("\n") == 1, r.stderr
    # each job handed its error back as its result: a job that exits leaves none, and submitit waits 15 s for it
    assert len(list(tmp_path.glob("runs/eval/*/.submitit/*/*_result.pkl"))) == 2
    # a command that a submitit job runs (its environment inherited) still ends in its one line
    r = cli("eval", "policy=nothing.pt", env={"SUBMITIT_FOLDER": str(tmp_path / "job"), "SUBMITIT_EXECUTOR": "slurm"})
    assert r.returncode == 2 and r.stderr.startswith("error: policy 'nothing.pt' is neither") and r.stderr.count("\n") == 1, r.stderr


@pytest.mark.skipif(shutil.which("srun") is not None, reason="this machine has Slurm: the sweep would be submitted")
def test_a_slurm_sweep_without_slurm_is_one_clear_line(cli_here, tmp_path):
    r = cli_here("eval", "-m", "hydra/launcher=submitit_slurm", "seed=0,1", "policy=random", "episodes=1")
    assert r.returncode == 2 and "this machine has no `srun`" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "runs").exists()  # no sweep directory left behind


def test_resume_true_finds_the_newest_run_of_exactly_that_name(tmp_path):
    from robodistill.errors import UserError
    from robodistill.training.runs import latest_run

    runs = tmp_path / "runs" / "rpd"
    for name in ("2026-01-01_00-00-00-robodistill-AGVWarehouse-v0", "2026-01-02_00-00-00-agv",
                 "2026-01-03_00-00-00-ppo-agv", "2026-01-04_00-00-00-agv"):
        (runs / name / "checkpoints").mkdir(parents=True)
        (runs / name / "checkpoints" / "last.zip").write_bytes(b"")
    (runs / "2026-01-04_00-00-00-agv" / "checkpoints" / "last.zip").unlink()  # killed before its first checkpoint
    new = runs / "2026-01-05_00-00-00-agv"  # the run that resumes
    # the name as its directory spells it (a task id's "/" as "-"), and not a longer name that ends with it
    assert latest_run("robodistill/AGVWarehouse-v0", new, "checkpoints/last.zip").name == "2026-01-01_00-00-00-robodistill-AGVWarehouse-v0"
    assert latest_run("agv", new, "checkpoints/last.zip").name == "2026-01-02_00-00-00-agv"
    with pytest.raises(UserError, match="no earlier run named 'gv'"):
        latest_run("gv", new, "checkpoints/last.zip")
    # in a sweep (-m), job n of the newest earlier sweep of that name: was "no earlier run" under the new sweep's directory
    for sweep, job_name in (("2026-01-06_00-00-00-multirun", "agv"), ("2026-01-07_00-00-00-multirun", "other")):
        for n in ("0", "1"):
            (runs / sweep / n / "checkpoints").mkdir(parents=True)
            (runs / sweep / n / "checkpoints" / "last.zip").write_bytes(b"")
            (runs / sweep / n / ".hydra").mkdir()
            (runs / sweep / n / ".hydra" / "config.yaml").write_text(f"name: {job_name}\n")
    job = runs / "2026-01-08_00-00-00-multirun" / "1"
    assert latest_run("agv", job, "checkpoints/last.zip") == runs / "2026-01-06_00-00-00-multirun" / "1"
    with pytest.raises(UserError, match="no earlier sweep under .* has a job 2 named 'agv'"):
        latest_run("agv", job.parent / "2", "checkpoints/last.zip")


@pytest.mark.parametrize("command", ["train-teacher", "train-vla", "distill"])
def test_an_optimizer_setting_that_cannot_train_is_one_clear_line(cli_here, command):
    for arg, message in (("lr=-1", "lr=-1.0 must be > 0"), ("lr=0", "lr=0.0 must be > 0"), ("warmup=-5", "warmup=-5 must be >= 0")):
        r = cli_here(command, arg)  # lr=-1 was torch's traceback, lr=0 and warmup=-5 trained as if nothing were wrong
        assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, (arg, r.stderr[-2000:])
    if command != "distill":  # AdamW's weight decay: torch's traceback for a negative one
        r = cli_here(command, "weight_decay=-1")
        assert r.returncode == 2 and "weight_decay=-1.0 must be >= 0" in r.stderr and r.stderr.count("\n") == 1, r.stderr[-2000:]


def test_distill_refuses_a_target_decay_its_ema_would_clip(cli_here):
    for decay in ("1.5", "-0.1", "1"):  # quietly ran as diffusers' warm-up schedule (1.5, 1) or as no EMA at all (-0.1)
        r = cli_here("distill", "variant=consistency", f"target_decay={decay}")
        assert r.returncode == 2 and f"target_decay={float(decay)} must be in [0, 1)" in r.stderr, r.stderr[-2000:]


def test_progress_bars_written_to_a_log_are_redrawn_seldom_and_say_where_the_run_went(tmp_path):
    """With stderr in a file or CI's log (not a terminal), every redraw of a bar stayed in it as a line: ten a
    second, thousands in a training run. Here the bar's 25 updates take a few seconds: it is drawn when it starts
    and when it ends; the run's last lines say where it went."""
    env = {k: v for k, v in os.environ.items() if k != "TQDM_MININTERVAL"}  # as a user's shell has it
    r = subprocess.run([*ROBODISTILL, "agv-train", "scene=simple_static", "num_envs=4", "num_steps=32", "total_steps=3200",
                        "eval_every=0", "eval_episodes=1", "obs_norm_init_steps=2", "name=log"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    frames = r.stderr.replace("\r", "\n").splitlines()
    drawn = [f for f in frames if f.startswith("ppo_rnd simple_static:")]
    assert 1 < len(drawn) <= 3 and "3200/3200" in drawn[-1], r.stderr[-2000:]
    (run,) = (tmp_path / "runs" / "agv-train").iterdir()
    assert r.stdout.splitlines()[-2:] == [f"run: {run}", f"curves: {run / 'curves.png'}"]


def test_summary_passes_over_a_run_that_wrote_nothing(cli_here, tmp_path):
    """A run killed with kill -9 (or crashed) before writing anything keeps only hydra's config: as the command's newest
    run it was listed as "(incomplete run)" in place of the run before it, e.g. after an rl100 resume=true, which goes on
    in the earlier run's directory."""
    runs = tmp_path / "runs" / "train-teacher"
    done, killed = runs / "2026-01-01_00-00-00-t", runs / "2026-01-02_00-00-00-t"
    done.mkdir(parents=True)
    (done / "metrics.jsonl").write_text(json.dumps({"step": 100, "loss": 0.01, "train_seconds": 60}) + "\n")
    (killed / ".hydra").mkdir(parents=True)
    (killed / ".hydra" / "config.yaml").write_text("name: t\n")
    r = cli_here("summary")
    assert r.returncode == 0 and r.stdout.splitlines()[2:] == [f"train-teacher  {done.name}  100 iterations in 1.0 min, loss 0.0100"], r.stdout


def test_a_ctrl_c_landing_in_maniskill_s_import_is_not_swallowed():
    # ManiSkill imports SAPIEN's renderer inside a bare `except:` (mani_skill/render/version.py): a Ctrl-C landing
    # there was swallowed, and the run trained on (rpd interrupted 0.3 s into its work: 1 run in 2)
    code = """
import os, signal, time
from robodistill.envs.factory import signals_held

def interrupt(signum, frame):
    raise KeyboardInterrupt

signal.signal(signal.SIGINT, interrupt)
try:
    with signals_held():
        try:  # as ManiSkill's import of the renderer
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
        except:
            pass
        print("the import went on", flush=True)
    print("the run went on")
except KeyboardInterrupt:
    print("interrupted")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.splitlines() == ["the import went on", "interrupted"], r.stdout + r.stderr[-2000:]
