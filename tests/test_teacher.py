"""The Diffusion Policy teacher: samplers, denoisers, real training runs, resume, evaluation."""

import json
import math
import os
import shutil
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import h5py
import pytest
import torch
from omegaconf import OmegaConf

from robodistill import checkpoints
from robodistill.data import Normalizer
from robodistill.errors import UserError
from robodistill.inference.samplers import make_sampler, make_training_scheduler
from robodistill.policies.diffusion import DiffusionConfig, DiffusionPolicy
from tests.conftest import ROBODISTILL

TINY = ["policy.mlp_hidden=[64,64]", "env.max_episode_steps=20", "eval_episodes=1", "threads=1"]


def test_samplers_call_the_denoiser_steps_times_and_ddim_is_deterministic():
    training = make_training_scheduler(100)
    calls = []

    def denoiser(x, t, cond):  # a real (analytic) denoiser: predicts noise proportional to x
        calls.append(int(t[0]))
        return 0.1 * x

    cond = torch.zeros(2, 3)
    out = make_sampler("ddpm", 5, training)(denoiser, cond, (2, 8, 4), torch.Generator().manual_seed(0))
    assert out.shape == (2, 8, 4) and len(calls) == 5 and calls == sorted(calls, reverse=True)
    ddim = make_sampler("ddim", 10, training)
    a = ddim(denoiser, cond, (2, 8, 4), torch.Generator().manual_seed(1))
    b = ddim(denoiser, cond, (2, 8, 4), torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        make_sampler("euler", 5, training)


@pytest.mark.parametrize("denoiser, extra", [("unet", dict(unet_dims=[16, 32])), ("mlp", dict(mlp_hidden=[32]))])
def test_both_denoisers_learn_and_return_bounded_chunks(denoiser, extra):
    torch.manual_seed(0)
    cfg = DiffusionConfig(denoiser=denoiser, pred_horizon=8, act_horizon=4, **extra)
    policy = DiffusionPolicy(cfg, 5, 3, -torch.ones(3) * 0.5, torch.ones(3) * 0.5)
    states, actions = torch.randn(100, 5), torch.rand(100, 3) * 2 - 1
    policy.load_normalizers({"state": Normalizer.fit(states.numpy()), "actions": Normalizer.fit(actions.numpy())})
    batch = {"obs": {"state": torch.randn(16, 2, 5)}, "actions": torch.rand(16, 8, 3) * 2 - 1}
    opt = torch.optim.Adam(policy.parameters(), 1e-3)
    losses = []
    for _ in range(30):
        loss = policy.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < sum(losses[:5])
    policy.eval()
    chunk = policy.predict_chunk({"state": torch.randn(2, 2, 5)})
    assert chunk.shape == (2, 4, 3) and chunk.abs().max() <= 0.5  # clipped to the action bounds
    with pytest.raises(UserError, match="sampler 'heun'"):
        policy.set_sampler("heun", 4)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "rti"])
def test_a_meanstd_policy_samples_actions_more_than_one_std_from_the_mean(sampler):
    """Under policy.normalizer=meanstd the data reach well past +-1 in model space, so the schedule's clip of the
    clean-chunk estimate to [-1, 1] (diffusion_policy's, for its [-1, 1] min-max space) would cap every action at
    one std from the demos' mean: a denoiser that knows the chunk exactly must get it back."""
    cfg = DiffusionConfig(normalizer="meanstd", pred_horizon=8, act_horizon=4, mlp_hidden=[32], prediction_type="sample")
    policy = DiffusionPolicy(cfg, 5, 3, -torch.ones(3) * 10, torch.ones(3) * 10).eval()
    actions = torch.tensor([[0.0, 0, 0], [0, 0, 0], [0, 0, 0], [4, 4, 4]])  # mean 1, std sqrt(3): 4 is 1.73 std out
    policy.load_normalizers({"state": Normalizer.fit(torch.randn(100, 5).numpy(), "meanstd"),
                             "actions": Normalizer.fit(actions.numpy(), "meanstd")})
    clean = policy.normalizers["actions"](torch.full((2, 8, 3), 4.0))
    policy.set_sampler(sampler)
    for _ in range(2):  # rti: a full denoise, then a warm-started tail
        x0 = policy.sampler(lambda x, t, cond: clean, torch.zeros(2, 3), (2, 8, 3), torch.Generator().manual_seed(0))
        torch.testing.assert_close(x0, clean)
    torch.testing.assert_close(policy.to_actions(x0), torch.full((2, 4, 3), 4.0))


@pytest.mark.parametrize("obs_horizon", [1, 2, 3])
def test_a_policy_executes_its_chunk_from_the_newest_observation_on(obs_horizon):
    """A training window's chunk starts at its oldest observation (data/windows.py), so its first obs_horizon - 1
    actions were taken before the newest observation, and the policy executes from the one after them."""
    cfg = DiffusionConfig(obs_horizon=obs_horizon, pred_horizon=8, act_horizon=4, mlp_hidden=[32])
    policy = DiffusionPolicy(cfg, 5, 3, -torch.ones(3), torch.ones(3))
    policy.load_normalizers({"state": Normalizer.fit(torch.randn(100, 5).numpy()),
                             "actions": Normalizer.fit(torch.tensor([[-1.0] * 3, [1.0] * 3]).numpy())})  # the identity
    x0 = (torch.arange(8.0) / 10).view(1, 8, 1).expand(2, 8, 3)  # action k of the chunk is k / 10
    assert policy.to_actions(x0)[:, :, 0].tolist() == [[pytest.approx((obs_horizon - 1 + k) / 10) for k in range(4)]] * 2


def test_unet_needs_a_horizon_multiple_of_four():
    with pytest.raises(UserError, match="multiple of 4"):
        DiffusionPolicy(DiffusionConfig(denoiser="unet", pred_horizon=10, act_horizon=4), 5, 3, -torch.ones(3), torch.ones(3))


def run_dir(root, name, command="train-teacher"):
    (path,) = [p for p in (root / "runs" / command).iterdir() if p.name.endswith(name)]
    return path


def test_killed_run_resumes_exactly_where_it_would_have_been(cli, tmp_path, pushcube_demos):
    args = [f"dataset={pushcube_demos}", *TINY, "iterations=600", "checkpoint_every=100"]
    straight = cli("train-teacher", *args, "eval_every=0", "name=straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    # The killed run also evaluates (validation loss and rollouts) every 100 iterations: that changes nothing it trains.
    args.append("eval_every=100")

    # kill -9 a second run soon after its first checkpoint: it loses at most one interval
    proc = subprocess.Popen([*ROBODISTILL, "train-teacher", *args, "name=killed"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list((tmp_path / "runs").glob("train-teacher/*-killed/checkpoints/last.pt")):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = checkpoints.load(run_dir(tmp_path, "killed") / "checkpoints" / "last.pt")  # loads: never half-written
    assert saved["step"] % 100 == 0 and 100 <= saved["step"] < 600

    # Resumed without the episode limit: the run goes on in the env it trained in, not the task's default.
    resumed = cli("train-teacher", *[a for a in args if a != "env.max_episode_steps=20"], "name=killed", "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at iteration {saved['step']}" in resumed.stdout
    assert "as the resumed run was trained: env.max_episode_steps=20" in resumed.stdout
    killed_runs = sorted((tmp_path / "runs" / "train-teacher").glob("*-killed"))  # the resumed run is the newest
    ends = [checkpoints.load(run_dir(tmp_path, "straight") / "checkpoints" / "last.pt"),
            checkpoints.load(killed_runs[-1] / "checkpoints" / "last.pt")]
    assert ends[0]["step"] == ends[1]["step"] == 600 and ends[1]["env"]["max_episode_steps"] == 20
    # Its metrics (and curves) go back to the start: the killed run's rows to its checkpoint, then its own.
    rows = [json.loads(line) for line in (killed_runs[-1] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [100, 200, 300, 400, 500, 600]
    for key in ("model", "ema"):
        for name, tensor in ends[0][key].items():
            torch.testing.assert_close(tensor, ends[1][key][name], rtol=0, atol=0, msg=f"{key}.{name}")


def test_teacher_checkpoint_evaluates_with_any_sampler_and_checks_the_env(cli, cli_here, tmp_path, pushcube_demos):
    train = cli("train-teacher", f"dataset={pushcube_demos}", *TINY, "iterations=20", "eval_every=0", "name=t")
    assert train.returncode == 0, train.stderr[-3000:]
    rows = [json.loads(l) for l in (run_dir(tmp_path, "t") / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 20 and 0 <= rows[-1]["success_once"] <= 1 and rows[-1]["val_loss"] is not None
    assert (run_dir(tmp_path, "t") / "curves.png").stat().st_size > 10_000  # its one evaluation, and the loss
    ckpt = run_dir(tmp_path, "t") / "checkpoints" / "best.pt"
    # Rated as trained (20-step episodes, not PushCube's 50) unless the command line says otherwise.
    for sampler, steps, limit in (("ddpm", 5, []), ("ddim", 3, ["env.max_episode_steps=15"])):
        r = cli("eval", f"policy={ckpt}", *limit, "episodes=1", f"sampler={sampler}", f"steps={steps}", f"name={sampler}")
        assert r.returncode == 0, r.stderr[-3000:]
        assert "success_once" in r.stdout
        assert ("as the policy was trained: env.max_episode_steps=20" in r.stdout) == (not limit), r.stdout
        rated = json.loads(run_dir(tmp_path, sampler, "eval").joinpath("eval.json").read_text())
        assert rated["env"]["max_episode_steps"] == (15 if limit else 20)
        assert OmegaConf.load(run_dir(tmp_path, sampler, "eval") / ".hydra" / "config.yaml").env.max_episode_steps == (15 if limit else 20)
        assert rated["episodes"][0]["episode_len"] == (15 if limit else 20)
        assert rated["sampler"] == {"name": sampler, "steps": steps} and f"sampler {sampler} {steps} steps" in r.stdout
    wrong_env = cli_here("eval", f"policy={ckpt}", "env=PickCube-v1", "episodes=1")
    assert wrong_env.returncode == 2 and "trained on {'task': 'PushCube-v1'" in wrong_env.stderr and "PickCube-v1" in wrong_env.stderr
    zero = cli_here("eval", f"policy={ckpt}", "episodes=1", "sampler=ddim", "steps=0")
    assert zero.returncode == 2 and "steps=0 must be between 1 and the 100 training timesteps" in zero.stderr, zero.stderr[-2000:]
    random_sampler = cli_here("eval", "policy=random", "sampler=ddim", "episodes=1")
    assert random_sampler.returncode == 2 and "apply to diffusion checkpoints" in random_sampler.stderr


def test_teacher_bad_input(cli_here, pushcube_demos, tmp_path):
    mode = cli_here("train-teacher", f"dataset={pushcube_demos}", *TINY, "env.control_mode=pd_joint_delta_pos", "iterations=2")
    assert mode.returncode == 2 and "recorded with control_mode=pd_ee_delta_pos, but pd_joint_delta_pos" in mode.stderr
    # PullCube's states have PushCube's 35 dims: only the file's env_id tells them apart
    task = cli_here("train-teacher", f"dataset={pushcube_demos}", *TINY, "env=PullCube-v1", "iterations=2")
    assert task.returncode == 2 and "was recorded in PushCube-v1, not in PullCube-v1, the task it would train for" in task.stderr
    # a .json whose control mode is not the actions' (a hand-edited one): it trained, then failed at its first evaluation
    relabeled = tmp_path / "relabeled.h5"
    shutil.copy(pushcube_demos, relabeled)
    meta = json.loads(pushcube_demos.with_suffix(".json").read_text())
    meta["env_info"]["env_kwargs"]["control_mode"] = "pd_joint_delta_pos"
    relabeled.with_suffix(".json").write_text(json.dumps(meta))
    actions = cli_here("train-teacher", f"dataset={relabeled}", *TINY, "env.control_mode=pd_joint_delta_pos", "iterations=2")
    assert actions.returncode == 2 and ("dataset actions have 4 dims, the env PushCube-v1 (pd_joint_delta_pos) takes 8: were they "
                                        "recorded with another control mode") in actions.stderr, actions.stderr[-2000:]
    missing = cli_here("train-teacher", "dataset=nowhere.h5", "iterations=2")
    assert missing.returncode == 2 and "'nowhere.h5' does not exist" in missing.stderr
    default = cli_here("train-teacher", "env=PickCube-v1", "iterations=2")  # no dataset=: the default is demos' name for it
    assert default.returncode == 2 and ("datasets/PickCube-v1/mp_n100_seed0.state.pd_ee_delta_pos.h5' does not exist: make it with "
                                        "`robodistill demos env=PickCube-v1 n=100 seed=0 env.obs_mode=state "
                                        "env.control_mode=pd_ee_delta_pos`") in default.stderr, default.stderr
    resume = cli_here("train-teacher", f"dataset={pushcube_demos}", *TINY, "iterations=2", "resume=true", "name=fresh")
    assert resume.returncode == 2 and "no earlier run named 'fresh'" in resume.stderr
    for args, message in {("iterations=0",): "iterations=0 and batch_size=64 must be >= 1",
                          ("minutes=-1",): "minutes=-1.0 must be > 0",
                          ("checkpoint_every=0",): "checkpoint_every=0 must be >= 1",
                          ("eval_every=-1", "iterations=2"): "eval_every=-1 must be >= 0 (iterations between evaluations; 0: only at the end)",
                          ("num_demos=50",): "holds 3 episodes: give 1 to 3 (0 or unset: all)",
                          ("val_fraction=1.5", "iterations=2"): "val_fraction=1.5 must be >= 0 and < 1",
                          ("val_fraction=-0.1", "iterations=2"): "val_fraction=-0.1 must be >= 0 and < 1",
                          ("policy.act_horizon=32",): "1 <= act_horizon <= pred_horizon - obs_horizon + 1 = 15",
                          ("device=gpu",): "device=gpu: robodistill trains on auto, cpu, cuda or cuda:<index>",
                          ("device=cuda:99",): "device=cuda:99",
                          ("threads=0", "iterations=2"): "threads=0 must be >= 1"}.items():  # was read as 1
        r = cli_here("train-teacher", f"dataset={pushcube_demos}", *TINY, *args)
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr[-2000:])
    negative = cli_here("train-teacher", f"dataset={pushcube_demos}", *[a for a in TINY if not a.startswith("eval_episodes")],
                        "eval_episodes=-1")  # said before training, not as a KeyError at its first evaluation
    assert negative.returncode == 2 and "eval_episodes=-1 must be >= 0 (0 turns evaluation off)" in negative.stderr, negative.stderr[-2000:]


def test_a_policy_block_that_cannot_train_or_sample_is_one_clear_line(cli_here, pushcube_demos):
    # each was a traceback from torch or diffusers, one at the first evaluation after training (sampler_steps=0),
    # or a run that trained on (prediction_type=foo: trained as `sample`, sampled as something else)
    for arg, message in {"policy.num_train_timesteps=0": "policy.num_train_timesteps=0 must be >= 1",
                         "policy.sampler_steps=0": "policy.sampler_steps=0 must be between 1 and policy.num_train_timesteps=100",
                         "policy.sampler=foo": "policy.sampler=foo is not one of ddim, ddpm",
                         "policy.beta_schedule=foo": "policy.beta_schedule=foo is not one of squaredcos_cap_v2, linear",
                         "policy.prediction_type=foo": "policy.prediction_type=foo is not one of sample, epsilon",
                         "policy.normalizer=foo": "policy.normalizer=foo is not one of minmax, meanstd",
                         "policy.crop=0": "policy.crop=0.0 must be in (0, 1]",
                         "policy.rgb_features=0": "policy.rgb_features=0 must be >= 1"}.items():
        r = cli_here("train-teacher", f"dataset={pushcube_demos}", *TINY, "iterations=2", arg)
        assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, (arg, r.stderr[-2000:])
    r = cli_here("train-teacher", f"dataset={pushcube_demos}", *TINY, "iterations=2", "policy.denoiser=unet", "policy.kernel_size=4")
    assert r.returncode == 2 and "policy.kernel_size=4 must be odd and >= 1" in r.stderr, r.stderr[-2000:]


def test_rgb_teacher_trains_and_evaluates(cli, cli_here, tmp_path, pickcube_rgb_demos):
    # The 48 px demos against the env's default 128 px camera: said before any training, not saved as a 128 px policy.
    wrong = cli_here("train-teacher", f"dataset={pickcube_rgb_demos['path']}", *TINY, "env=PickCube-v1", "env.obs_mode=rgb")
    assert wrong.returncode == 2 and "holds 48x48 px images, but env.image_size=128: set env.image_size=48" in wrong.stderr, wrong.stderr
    r = cli("train-teacher", f"dataset={pickcube_rgb_demos['path']}", *TINY, "env=PickCube-v1", "env.obs_mode=rgb", "env.image_size=48",
            "iterations=6", "batch_size=8", "eval_every=0", "name=rgb")
    assert r.returncode == 0, r.stderr[-3000:]
    saved = checkpoints.load(run_dir(tmp_path, "rgb") / "checkpoints" / "last.pt")
    assert saved["policy"]["dims"]["rgb_channels"] == 3 and saved["step"] == 6
    assert any(k.startswith("encoder.cnn") for k in saved["model"])


def test_rgb_training_crops_each_image_at_its_own_offset_and_evaluation_at_the_centre():
    from robodistill.policies.diffusion.encoders import RgbEncoder

    encoder = RgbEncoder(channels=3, state_dim=2, horizon=2, crop=0.75)
    images = torch.arange(64 * 3 * 8 * 8, dtype=torch.float32).view(64, 3, 8, 8)  # every pixel tells where it was
    torch.manual_seed(0)
    crops = encoder.train()._crop(images)
    assert crops.shape == (64, 3, 6, 6)
    offsets = set()
    for crop, image in zip(crops, images):  # a window of the image itself, every channel at the same place
        top, left = divmod(int(crop[0, 0, 0] - image[0, 0, 0]), 8)
        torch.testing.assert_close(crop, image[:, top : top + 6, left : left + 6])
        offsets.add((top, left))
    assert len(offsets) > 4  # was one offset for the whole batch: every image shifted alike
    torch.testing.assert_close(encoder.eval()._crop(images), images[..., 1:7, 1:7])


def test_an_rgb_policy_driven_from_python_refuses_float_or_channel_first_images(pickcube_rgb_teacher):
    from robodistill.envs import EnvConfig, make_env
    from robodistill.policies import load_policy

    with make_env(EnvConfig(task="PickCube-v1", obs_mode="rgb", image_size=48)) as env:
        policy = load_policy(pickcube_rgb_teacher, env)
        first = env.reset(seed=[0])
    obs = {k: v[:, None].repeat_interleave(policy.obs_horizon, 1) for k, v in first.items()}
    assert policy.predict_chunk(obs).shape[1] == policy.act_horizon
    # A float image in [0, 1] was divided by 255 again and acted on as a black frame; a channel-first one failed in conv2d.
    for rgb in (obs["rgb"].float() / 255, obs["rgb"].movedim(-1, -3)):
        with pytest.raises(UserError, match=r"takes camera images as uint8 pixels 0-255, \(B, T, H, W, 3\) channel-last"):
            policy.predict_chunk({**obs, "rgb": rgb})


def test_a_resumed_run_keeps_the_best_checkpoint_it_resumed_with(cli, tmp_path, pushcube_demos):
    args = [f"dataset={pushcube_demos}", *TINY, "eval_every=10", "checkpoint_every=10", "name=b"]
    first = cli("train-teacher", *args, "iterations=20")
    assert first.returncode == 0, first.stderr[-3000:]
    best = checkpoints.load(run_dir(tmp_path, "b") / "checkpoints" / "best.pt")
    more = cli("train-teacher", *args, "iterations=30", "resume=true")
    assert more.returncode == 0 and "at iteration 20" in more.stdout, more.stderr[-3000:]
    resumed = sorted((tmp_path / "runs" / "train-teacher").glob("*-b"))[-1]
    kept = checkpoints.load(resumed / "checkpoints" / "best.pt")  # unless it evaluated better: the same step and weights
    assert kept["step"] >= best["step"] and kept["best"] >= best["best"]
    if kept["best"] == best["best"]:
        assert kept["step"] == best["step"] and all(torch.equal(v, kept["ema"][k]) for k, v in best["ema"].items())


def test_plot_summary_and_resume_read_metrics_whose_last_line_is_still_being_written(cli_here, tmp_path):
    from robodistill.curves import series
    from robodistill.training.runs import carry_metrics

    run = tmp_path / "runs" / "train-teacher" / "2026-01-01_00-00-00-t"
    (run / "checkpoints").mkdir(parents=True)
    rows = [{"step": s, "loss": 0.1 / s, "train_seconds": s, "success_once": s / 400, "ci95": [0.0, 0.9]} for s in (100, 200)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 300, "lo')  # appended as read
    _, success, loss, _ = series(run, "t", "train-teacher")
    assert success == {"t": [(100, 0.25, 0.0, 0.9), (200, 0.5, 0.0, 0.9)]} and loss == [(100, 0.001), (200, 0.0005)]
    plotted = cli_here("plot", str(run), "--out", str(tmp_path / "c.png"))
    assert plotted.returncode == 0 and (tmp_path / "c.png").stat().st_size > 0, plotted.stderr[-2000:]
    blocked = cli_here("plot", str(run), "--out", str(run / "metrics.jsonl" / "c.png"))  # a file on its path
    assert blocked.returncode == 2 and f"cannot write {run / 'metrics.jsonl' / 'c.png'} (" in blocked.stderr, blocked.stderr[-2000:]
    table = cli_here("summary", "--runs", str(tmp_path / "runs"))
    # the run's last evaluation, as the rows of train-vla, rpd and agv-train say theirs
    assert "200 iterations in 3.3 min, loss 0.0005, success_once 50% [0%, 90%]" in table.stdout, table.stdout
    carry_metrics(run / "checkpoints" / "last.pt", 200, tmp_path)  # resumed after a kill cut the line short
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == rows
    (run / "metrics.jsonl").write_text('{"step": 1\n' + json.dumps(rows[0]) + "\n")  # damaged, not being written
    damaged = cli_here("plot", str(run), "--out", str(tmp_path / "d.png"))
    assert damaged.returncode == 2 and f"{run / 'metrics.jsonl'} is damaged" in damaged.stderr, damaged.stderr[-2000:]


def test_curves_show_a_lone_evaluation_with_its_interval_and_a_flat_loss_by_its_values(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

    from robodistill.curves import plot

    drawn, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig: drawn.append(fig) or close(fig))  # kept to look at, still closed
    run = tmp_path / "runs" / "train-teacher" / "2026-01-01_00-00-00-t"
    run.mkdir(parents=True)
    # eval_every=0: one evaluation at the end; a loss flat to 1e-6
    (run / "metrics.jsonl").write_text(json.dumps({"step": 20, "loss": 0.023411, "success_once": 0.5, "ci95": [0.2, 0.8]}) + "\n")
    plot([run], tmp_path / "one.png")
    top, bottom = drawn[-1].axes
    (bar,) = [c for c in top.collections if isinstance(c, LineCollection)]  # its interval, where a band had no width
    assert bar.get_segments()[0][:, 1].tolist() == [0.2, 0.8]
    (loss,) = bottom.lines
    assert loss.get_marker() == "o" and loss.get_xydata().tolist() == [[20, 0.023411]]
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 0.023411 + s * 1e-8, "success_once": 0.5,
                                                           "ci95": [0.2, 0.8]}) + "\n" for s in (100, 200)))
    plot([run], tmp_path / "flat.png")
    bottom = drawn[-1].axes[1]
    drawn[-1].canvas.draw()
    ticks = [float(t.get_text().replace("\u2212", "-")) for t in bottom.get_yticklabels() if t.get_text()]
    assert bottom.yaxis.get_offset_text().get_text() == "" and all(0.0234 < t < 0.0235 for t in ticks), ticks


def test_curves_legend_of_runs_that_differ_in_long_overrides_stays_inside_the_figure(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from robodistill.curves import plot

    drawn, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig: drawn.append(fig) or close(fig))  # kept to look at, still closed
    # two runs of one name, labelled by the overrides they differ in: a teacher's path and a few settings, as
    # `plot` of rpd runs with and without a teacher (or a run and its resumed continuation) gives them
    teacher = "teacher=runs/train-teacher/2026-01-01_00-00-00-PushCube-v1-mlp/checkpoints/last.pt"
    given = {"a": ["env=PushCube-v1", teacher, "total_steps=400", "eval_every=200", "eval_episodes=30", "obs_norm_steps=50",
                   "batch_size=50", "checkpoint_every=200"], "b": ["teacher=none", "total_steps=600"]}
    for stamp, overrides in zip(("00", "01"), given.values()):
        run = tmp_path / "runs" / "rpd" / f"2026-01-01_00-00-{stamp}-rpd"
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in ["name=rpd", *overrides]))
        (run / "history.json").write_text(json.dumps([{"step": s, "success_once": 0.5, "ci95": [0.2, 0.8], "return": 3.0}
                                                      for s in (0, 200)]))
    plot(sorted((tmp_path / "runs" / "rpd").iterdir()), tmp_path / "c.png")
    fig = drawn[-1]
    canvas = FigureCanvasAgg(fig)  # pyplot's close detached its own
    canvas.draw()
    top = fig.axes[0]
    legend = top.get_legend().get_window_extent(canvas.get_renderer())
    assert fig.bbox.x0 <= legend.x0 and legend.x1 <= fig.bbox.x1, (legend, fig.bbox)  # was cut off at the left edge
    assert top.get_window_extent().width > 0.7 * fig.bbox.width  # and the axes were squeezed into a third of the width
    # wrapped between overrides: a path is kept whole, not broken at one of its hyphens
    assert [t.get_text().replace("\n", " ") for t in top.get_legend().get_texts()] == [f"rpd {' '.join(given['a'])}",
                                                                                       "rpd teacher=none total_steps=600"]


def test_resume_goes_on_with_the_runs_own_settings_and_applies_the_ones_given(cli, cli_here, tmp_path, pushcube_demos):
    first = cli("train-teacher", f"dataset={pushcube_demos}", *TINY, "iterations=20", "eval_every=10", "checkpoint_every=10",
                "lr=1e-4", "batch_size=16", "ema_power=0.5", "name=r")
    assert first.returncode == 0, first.stderr[-3000:]
    # Only what changes: the run's dataset, batch size, evaluations and network stay its own, not the defaults'; the
    # learning rate given reaches the optimizer, where the checkpoint's used to win while the config recorded the given one.
    more = cli("train-teacher", "name=r", "resume=true", "iterations=30", "lr=3e-4", "threads=1")
    assert more.returncode == 0, more.stderr[-3000:]
    assert (f"as the resumed run was trained: dataset={pushcube_demos} batch_size=16 ema_power=0.5 eval_every=10 eval_episodes=1 "
            "checkpoint_every=10 policy.mlp_hidden=[64,64]") in more.stdout, more.stdout
    resumed = sorted((tmp_path / "runs" / "train-teacher").glob("*-r"))[-1]
    saved = checkpoints.load(resumed / "checkpoints" / "last.pt")
    assert saved["step"] == 30 and saved["train"]["batch_size"] == 16 and saved["ema_state"]["power"] == 0.5
    assert saved["optimizer"]["param_groups"][0]["initial_lr"] == saved["lr_schedule"]["base_lrs"][0] == 3e-4
    recorded = OmegaConf.load(resumed / ".hydra" / "config.yaml")
    assert recorded.batch_size == 16 and recorded.lr == 3e-4 and list(recorded.policy.mlp_hidden) == [64, 64]
    assert [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()] == [10, 20, 30]
    # The network is the checkpoint's weights': another one is one line, not a dump of both configs.
    other = cli_here("train-teacher", "name=r", "resume=true", "iterations=40", "policy.mlp_hidden=[32]")
    assert other.returncode == 2 and ("policy.mlp_hidden=[32]: the resumed run's policy was built with policy.mlp_hidden=[64,64]"
                                      in other.stderr and "drop policy.mlp_hidden= to continue it" in other.stderr), other.stderr[-2000:]
    # Another dataset whose actions make another model (no open/close gripper dim): what differs, not both specs in full.
    half = tmp_path / "half_gripper.h5"
    shutil.copy(pushcube_demos, half)
    shutil.copy(pushcube_demos.with_suffix(".json"), half.with_suffix(".json"))
    with h5py.File(half, "r+") as f:
        for traj in f.values():
            traj["actions"][:, 3] *= 0.5
    data = cli_here("train-teacher", "name=r", "resume=true", "iterations=40", f"dataset={half}")
    assert data.returncode == 2 and (f"holds a policy with gripper_dims=[3], where dataset={half} in PushCube-v1 (state, pd_ee_delta_pos) "
                                     "makes gripper_dims=[]: resume with the run's own dataset= and env") in data.stderr, data.stderr[-2000:]


def test_a_resumed_run_reads_its_checkpoint_once(cli_here, tmp_path, pushcube_demos, monkeypatch):
    """main read it for the env it trained in, again for its settings, and train() a third time: three torch.loads of
    the whole model, EMA and optimizer state (agv-train's resume reads it once)."""
    tiny = [a for a in TINY if not a.startswith("eval_episodes=")]
    first = cli_here("train-teacher", f"dataset={pushcube_demos}", *tiny, "iterations=10", "eval_episodes=0", "name=once")
    assert first.returncode == 0, first.stderr[-3000:]
    last = (run_dir(tmp_path, "once") / "checkpoints" / "last.pt").resolve()
    reads, load = [], checkpoints.load
    monkeypatch.setattr(checkpoints, "load", lambda path, *a, **kw: reads.append(Path(path).resolve()) or load(path, *a, **kw))
    more = cli_here("train-teacher", "name=once", "resume=true", "iterations=20")
    assert more.returncode == 0 and "resumed from" in more.stdout and "at iteration 10" in more.stdout, more.stderr[-3000:]
    assert "as the resumed run was trained: env.max_episode_steps=20" in more.stdout  # its env, from that one read
    assert reads.count(last) == 1, reads
    # Another command's checkpoint is refused before anything is taken from it.
    checkpoints.save(tmp_path / "agv.pt", {"kind": "agv_ppo", "env": {"task": "PushCube-v1", "max_episode_steps": 7}})
    other = cli_here("train-teacher", f"resume_from={tmp_path / 'agv.pt'}", "iterations=20")
    assert other.returncode == 2 and other.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'agv.pt'} holds a 'agv_ppo', not a train-teacher run's state: resume from "
        "runs/train-teacher/<run>/checkpoints/last.pt") and "as the resumed run was trained" not in other.stdout, other.stderr[-2000:]


def test_metrics_the_disk_has_no_room_for_end_the_run_in_one_line_keeping_the_rows_before(tmp_path, pushcube_demos, capsys):
    # metrics.jsonl, open for the whole run, ended it in OSError's traceback from metrics.flush(). (capsys: what the
    # run prints goes to memory, not to pytest's capture file, which the limit would cut short too.)
    from robodistill.envs import EnvConfig
    from robodistill.errors import CutShort
    from robodistill.summary import jsonl_rows
    from robodistill.training.teacher import TrainTeacherConfig, train
    from tests.conftest import disk_full_past

    cfg = TrainTeacherConfig(env=EnvConfig(task="PushCube-v1"), dataset=str(pushcube_demos), iterations=40, batch_size=8,
                             eval_every=1, eval_episodes=0, val_fraction=0, threads=1)
    with disk_full_past(2000), pytest.raises(CutShort, match=r"could not write .*metrics.jsonl: File too large \(the rows before this one are kept\)"):
        train(cfg, tmp_path / "run")
    rows = jsonl_rows(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)) and len(rows) > 5


def test_training_whose_loss_diverges_ends_in_one_line_saving_nothing_of_it(tmp_path, pushcube_demos):
    # it trained on with a NaN loss, and its NaN weights met the evaluation as ManiSkill's "Action cannot be NaN"
    # traceback (or, with no evaluation, were saved as a finished run)
    from robodistill.envs import EnvConfig
    from robodistill.training.teacher import TrainTeacherConfig, train

    cfg = TrainTeacherConfig(env=EnvConfig(task="PushCube-v1"), dataset=str(pushcube_demos), iterations=60, batch_size=8, lr=1e30,
                             warmup=0, eval_every=0, eval_episodes=0, val_fraction=0, threads=1)
    with pytest.raises(UserError, match=r"^the training loss stopped being finite by iteration 50: training diverged at lr=1e\+30: "
                                        r"lower lr= \(or raise warmup=\) and start again$"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_a_run_resumed_in_its_own_directory_logs_each_step_once_to_tensorboard(tmp_path, pushcube_demos):
    """rl100 resumes its imitation stage in place: the steps a killed run had logged after its checkpoint were
    logged again, so TensorBoard drew each of them twice, and metrics.jsonl must not hold them twice either."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from robodistill.envs import EnvConfig
    from robodistill.summary import jsonl_rows
    from robodistill.training.teacher import TrainTeacherConfig, train

    run = tmp_path / "imitation"
    last = run / "checkpoints" / "last.pt"
    cfg = TrainTeacherConfig(env=EnvConfig(task="PushCube-v1"), dataset=str(pushcube_demos), iterations=100, batch_size=8,
                             eval_every=0, eval_episodes=0, val_fraction=0, threads=1)
    train(cfg, run)  # its checkpoint at iteration 100
    kept = last.read_bytes()
    train(replace(cfg, iterations=150, resume_from=str(last)), run)  # logs iteration 150, then is killed before
    last.write_bytes(kept)  # its next checkpoint: it goes on from iteration 100, as rl100 resume=true does
    train(replace(cfg, iterations=150, resume_from=str(last)), run)
    logged = EventAccumulator(str(run / "tb"))
    logged.Reload()
    assert [e.step for e in logged.Scalars("train/loss")] == [50, 100, 150]
    assert [r["step"] for r in jsonl_rows(run / "metrics.jsonl")] == [100, 150]


@pytest.mark.parametrize("command", ["train-teacher", "rl100"])
def test_demo_trained_episodes_are_never_shorter_than_the_task_s_own_nor_its_demos(command):
    # Every task got 100 steps: PlugCharger half of its own 200, StackCube (demos to 107 steps), LiftPegUpright (183)
    # and PegInsertionSide (189) less than their motion-planning demos take.
    from robodistill.configs import compose_checked, register_schemas
    from robodistill.envs.factory import registered_episode_steps

    register_schemas(command)
    tasks = sorted(p.stem for p in (Path(__file__).parents[1] / "configs" / "env").glob("*-v*.yaml"))
    limits = {t: OmegaConf.to_container(compose_checked(command, [f"env={t}"]).env, resolve=True)["max_episode_steps"] for t in tasks}
    assert all(limits[t] >= registered_episode_steps(t) for t in tasks), limits
    assert {t: limits[t] for t in ("PushCube-v1", "PickCube-v1", "PlugCharger-v1", "StackCube-v1", "LiftPegUpright-v1",
                                   "PegInsertionSide-v1")} == {"PushCube-v1": 100, "PickCube-v1": 100, "PlugCharger-v1": 200,
                                                               "StackCube-v1": 150, "LiftPegUpright-v1": 250, "PegInsertionSide-v1": 250}


def test_the_smallest_camera_is_the_first_size_whose_crop_keeps_9_px_and_moves():
    # It was this search up to 10,000: a crop under 0.0009 (policy.crop=0.0005) ended in StopIteration's traceback.
    from robodistill.policies.diffusion.encoders import check_image_size

    def searched(crop):
        return next(s for s in range(1, 100_000) if max(1, int(s * crop)) >= 9 and (crop == 1 or int(s * crop) < s))

    crops = {*(i / 400 for i in range(1, 401)), math.nextafter(1, 0), 0.0005}
    crops |= {c for n in range(9, 300) for c in (9 / n, math.nextafter(9 / n, 0), math.nextafter(9 / n, 1)) if c <= 1}
    for crop in crops:
        smallest = searched(crop)
        check_image_size(smallest, crop, "env.image_size")
        with pytest.raises(UserError, match=rf"^env.image_size={smallest - 1} is too small for the policy's camera CNN: use {smallest} or more"):
            check_image_size(smallest - 1, crop, "env.image_size")


def test_a_camera_too_small_for_the_cnn_is_one_clear_line(tmp_path):
    # env.image_size=3 trained: the CNN pools any size, here a 2 px crop that cannot move, pooled from one position
    from robodistill.envs import EnvConfig
    from robodistill.training.teacher import TrainTeacherConfig, train

    for size, crop, smallest in ((3, 0.9, 10), (9, 0.9, 10), (8, 1.0, 9)):
        cfg = TrainTeacherConfig(env=EnvConfig(obs_mode="rgb", image_size=size), policy=DiffusionConfig(crop=crop), dataset="none.h5")
        with pytest.raises(UserError, match=rf"^env.image_size={size} is too small for the policy's camera CNN: use {smallest} or more"):
            train(cfg, tmp_path)
