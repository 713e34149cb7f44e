"""Fast control: the RTI warm-start sampler, the consistency head (`distill`), `bench-latency`."""

import json
import re
import shutil
import signal
import subprocess
import time
from dataclasses import replace

import pytest
import torch
from diffusers import DDIMScheduler

from robodistill import checkpoints
from robodistill.data import Normalizer
from robodistill.envs import EnvConfig
from robodistill.errors import UserError
from robodistill.inference.latency import figure, measure
from robodistill.inference.samplers import (ConsistencySampler, RTIConfig, RTISampler, consistency_timesteps, ddim_step,
                                            make_training_scheduler)
from robodistill.policies.diffusion import DiffusionConfig, DiffusionPolicy
from robodistill.policies.diffusion.consistency import ConsistencyHead
from robodistill.summary import summarize
from tests.conftest import ROBODISTILL, run_cli
from tests.test_teacher import TINY, run_dir


@pytest.fixture(scope="module")
def teacher_10(pushcube_demos, tmp_path_factory):
    """`train-teacher` of the PushCube demos for 10 iterations, run by the CLI once for the tests that only distill,
    rate or time a teacher (each trained this same one in a CLI run of its own): see `teacher_run`."""
    root = tmp_path_factory.mktemp("teacher_10")
    train = run_cli("train-teacher", f"dataset={pushcube_demos}", *TINY, "iterations=10", "eval_every=0", "eval_episodes=0", "name=t", cwd=root)
    assert train.returncode == 0, train.stderr[-3000:]
    return run_dir(root, "t")


@pytest.fixture
def teacher_run(teacher_10, tmp_path):
    """The test's own copy of `teacher_10`'s run, where that test's CLI run would have put it (tmp_path/runs/train-teacher)."""
    return shutil.copytree(teacher_10, tmp_path / "runs" / "train-teacher" / teacher_10.name)


class Recorder:
    """A real analytic x0-predicting denoiser (shrinks x) that records what it was called with."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, cond):
        self.calls.append((int(t[0]), x.clone()))
        return 0.5 * x.clamp(-1, 1)


def test_rti_warm_starts_from_the_shifted_chunk_and_runs_only_its_tail():
    training = make_training_scheduler(100, prediction_type="sample")
    rti = RTISampler(RTIConfig(timesteps=[3, 1, 0], actions_per_inference=2, gripper="none"), training, None)
    den, cond, gen = Recorder(), torch.zeros(2, 3), torch.Generator().manual_seed(0)
    first = rti(den, cond, (2, 8, 4), gen)
    assert len(den.calls) == 100  # the full DDPM denoise that starts an episode

    den.calls.clear()
    rti(den, cond, (2, 8, 4), gen)
    assert [t for t, _ in den.calls] == [3, 1, 0]
    shifted = torch.cat([first[:, 2:], first[:, -1:], first[:, -1:]], dim=1)  # 2 actions executed, last repeated
    torch.testing.assert_close(den.calls[0][1], shifted)

    rti.reset(torch.tensor([1]))  # stream 1's episode restarted: it alone is denoised from scratch
    den.calls.clear()
    rti(den, cond, (2, 8, 4), gen, streams=torch.tensor([0, 1]))
    assert len(den.calls) == 100 + 3 and den.calls[0][1].shape[0] == 1
    with pytest.raises(ValueError, match="strictly descending"):
        RTISampler(RTIConfig(timesteps=[1, 3]), training, None)


def _policy(**cfg):
    torch.manual_seed(0)
    policy = DiffusionPolicy(DiffusionConfig(pred_horizon=8, act_horizon=4, mlp_hidden=[32], **cfg), 5, 3,
                             -torch.ones(3), torch.ones(3), gripper_dims=[2])
    actions = torch.rand(100, 3) * 0.4 - 0.2
    actions[:, 2] = torch.where(torch.rand(100) > 0.5, 1.0, -1.0)
    policy.load_normalizers({"state": Normalizer.fit(torch.randn(100, 5).numpy()), "actions": Normalizer.fit(actions.numpy())})
    return policy.eval()


@pytest.mark.parametrize("first, message", [
    (dict(first_steps=1000), r"rti.first_steps=1000 must be between 1 and the 100 training timesteps"),  # was a traceback mid-episode
    (dict(first_steps=0), r"rti.first_steps=0 must be between 1"),  # was read as null: all 100
    (dict(first_steps=-3), r"rti.first_steps=-3 must be between 1"),
    (dict(first="consistency"), r"rti.first='consistency' is not one of ddpm, ddim"),
])
def test_rti_refuses_a_first_denoise_it_cannot_run(first, message):
    with pytest.raises(UserError, match=message):
        _policy().set_sampler("rti", rti=RTIConfig(**first))


@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_rti_snaps_the_gripper_and_the_scale_variant_keeps_it_small(scale):
    policy = _policy(gripper_scale=scale)
    policy.set_sampler("rti", rti=RTIConfig(timesteps=[2, 1, 0]))
    assert policy.act_horizon == 4  # the policy's own, unless rti.actions_per_inference says otherwise
    policy.set_sampler("rti", rti=RTIConfig(timesteps=[2, 1, 0], actions_per_inference=1))
    assert policy.act_horizon == 1
    obs = {"state": torch.randn(3, 2, 5)}
    for _ in range(3):
        chunk = policy.predict_chunk(obs, streams=torch.arange(3))
        assert chunk.shape == (3, 1, 3) and set(chunk[..., 2].flatten().tolist()) <= {-1.0, 1.0}
    stored = policy.sampler.memory[..., 2].abs()  # the guess the next call warm-starts from, model space
    torch.testing.assert_close(stored, torch.full_like(stored, 1 / scale))
    policy.set_sampler("ddim", 4)
    assert policy.act_horizon == 4
    policy.set_sampler("rti", rti=RTIConfig(actions_per_inference=7))  # all a chunk holds from the newest observation on
    assert policy.predict_chunk(obs, streams=torch.arange(3)).shape == (3, 7, 3)
    with pytest.raises(UserError, match=r"rti.actions_per_inference=8 is more than the 7 actions a chunk holds"):
        policy.set_sampler("rti", rti=RTIConfig(actions_per_inference=8))


def test_consistency_head_keeps_clean_chunks_and_samples_in_its_steps():
    head = ConsistencyHead.from_denoiser(_policy().denoiser)
    x, cond = torch.randn(2, 8, 3), torch.randn(2, 10)
    torch.testing.assert_close(head(x, torch.zeros(2, dtype=torch.long), cond), x)  # f(x, 0) = x
    assert consistency_timesteps(1, 100) == [99] and consistency_timesteps(3, 100) == [99, 66, 33]


def test_consistency_head_scales_as_lcm_s_boundary_condition_and_jumps_as_it_forwards():
    """f(x, t) = c_skip(t) x + c_out(t) F(x, t), c_skip and c_out those of diffusers' LCMScheduler at timestep_scaling 10
    (d = 0.1): at every t > 0 f is almost all F's clean chunk, which f(x, 0) = x alone does not check. The sampler's
    jump (cached embedding, scalings as numbers) is the same function."""
    from diffusers import LCMScheduler

    head = ConsistencyHead.from_denoiser(_policy().denoiser).eval()
    lcm = LCMScheduler(timestep_scaling=10.0)
    x, cond = torch.randn(2, 8, 3), torch.randn(2, 10)
    for t in (0, 1, 5, 33, 99):
        assert head.scalings(t) == pytest.approx(lcm.get_scalings_for_boundary_condition_discrete(t), rel=1e-12, abs=0)
        torch.testing.assert_close(head.jump(x, t, cond), head(x, torch.full((2,), t), cond))


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
def test_consistency_distillation_steps_the_teacher_as_its_ddim_sampler_does(prediction_type):
    """variant=consistency's target is the head at t - skip after one step of the teacher's own DDIM sampler, which
    takes epsilon from the unclipped clean-chunk estimate: one formed from the clipped estimate instead (4.2 apart at
    t=50 for an epsilon teacher whose estimate leaves [-1, 1]) is the target of another ODE than the one it samples."""
    policy = _policy(prediction_type=prediction_type)
    x = torch.randn(2, 8, 3) * 1.5  # an epsilon teacher's estimates leave [-1, 1]
    cond = policy.condition({"state": torch.randn(2, 2, 5)})
    t_hi = torch.tensor([50, 30])  # a timestep per sample, as distillation draws them
    alphas = policy.noise_scheduler.alphas_cumprod
    with torch.no_grad():
        pred = policy.denoiser(x, t_hi, cond)
        step = ddim_step(pred, x, alphas[t_hi].view(-1, 1, 1), alphas[t_hi - 10].view(-1, 1, 1), policy.noise_scheduler)
    ddim = DDIMScheduler.from_config(policy.noise_scheduler.config)
    ddim.set_timesteps(10)  # a step spans 100 // 10 = skip timesteps
    for i, t in enumerate(t_hi.tolist()):
        torch.testing.assert_close(step[i], ddim.step(pred[i : i + 1], t, x[i : i + 1]).prev_sample[0])


def test_multistep_consistency_sampling_re_noises_its_clean_estimate_to_the_next_timestep():
    """steps=2: a jump from noise at t=99, then the clean estimate noised to t=50 and a second jump from there. A second
    jump from fresh noise would be a one-step sample at a lower timestep, not a refinement of the first."""

    class Head:  # an analytic head (shrinks x) that records what it is asked
        def __init__(self):
            self.calls = []

        def jump(self, x, t, cond):
            self.calls.append((t, x.clone()))
            return 0.5 * x

    training, head = make_training_scheduler(100, prediction_type="sample"), Head()
    out = ConsistencySampler(head, 2, training)(None, torch.zeros(3, 4), (3, 8, 2), torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    x_T, noise = torch.randn((3, 8, 2), generator=gen), torch.randn((3, 8, 2), generator=gen)
    assert [t for t, _ in head.calls] == [99, 50]
    torch.testing.assert_close(head.calls[0][1], x_T)
    renoised = training.add_noise((0.5 * x_T).clamp(-1, 1), noise, torch.full((3,), 50))
    torch.testing.assert_close(head.calls[1][1], renoised)
    torch.testing.assert_close(out, (0.5 * renoised).clamp(-1, 1))


def test_consistency_distillation_asks_the_target_one_teacher_step_below_the_head(teacher_run, tmp_path, monkeypatch):
    """variant=consistency pulls the head at (x_t, t) to its target copy at (x_{t - skip}, t - skip), x_{t - skip} one
    step of the teacher's DDIM from x_t: a target asked at t, or at x_t, is not a point further down the teacher's ODE."""
    from robodistill.training.distill import DistillConfig, train

    calls, forward = [], ConsistencyHead.forward

    def recorded(self, x, t, cond):
        calls.append((torch.is_grad_enabled(), x.detach().clone(), t.clone(), cond.detach().clone()))
        return forward(self, x, t, cond)

    monkeypatch.setattr(ConsistencyHead, "forward", recorded)
    ckpt = teacher_run / "checkpoints" / "last.pt"
    train(DistillConfig(teacher=str(ckpt), variant="consistency", skip=10, iterations=2, batch_size=4, warmup=0, eval_episodes=0,
                        threads=1, device="cpu"), tmp_path / "run")
    payload = checkpoints.load(ckpt)
    teacher = DiffusionPolicy.from_spec(payload["policy"])
    teacher.load_state_dict(payload["ema"])
    alphas = teacher.eval().noise_scheduler.alphas_cumprod
    assert [grad for grad, *_ in calls] == [False, True] * 2  # each iteration: the target (no gradient), then the head
    for (_, x_lo, t_lo, cond), (_, x_hi, t_hi, _) in zip(calls[::2], calls[1::2]):
        assert torch.equal(t_lo, t_hi - 10)
        with torch.no_grad():
            step = ddim_step(teacher.denoiser(x_hi, t_hi, cond), x_hi, alphas[t_hi].view(-1, 1, 1), alphas[t_lo].view(-1, 1, 1),
                             teacher.noise_scheduler)
        torch.testing.assert_close(x_lo, step)


def test_a_sampler_without_steps_takes_its_own_default_not_the_previous_samplers():
    """sampler=consistency alone is the one-step head, and ddpm/ddim alone the checkpoint's steps, whatever sampler
    came before (the checkpoint's ddim 10, or the previous row of bench-latency)."""
    policy = _policy(sampler_steps=7)
    policy.consistency = ConsistencyHead.from_denoiser(policy.denoiser)
    policy.set_sampler("consistency")
    assert (policy.sampler.name, policy.sampler.steps) == ("consistency", 1)
    policy.set_sampler("ddpm", 50)
    policy.set_sampler("ddim")
    assert (policy.sampler.name, policy.sampler.steps) == ("ddim", 7)
    policy.set_sampler("rti", rti=RTIConfig(timesteps=[2, 1, 0]))
    policy.set_sampler("consistency")
    assert (policy.sampler.name, policy.sampler.steps) == ("consistency", 1)


def test_distill_both_variants_then_eval_and_bench_latency(cli, cli_here, tmp_path, pushcube_demos):
    train = cli("train-teacher", f"dataset={pushcube_demos}", *TINY, "iterations=30", "eval_every=0", "eval_episodes=0", "name=t")
    assert train.returncode == 0, train.stderr[-3000:]
    teacher = run_dir(tmp_path, "t") / "checkpoints" / "last.pt"
    # A run that never evaluated has no best.pt: the error names the checkpoint it has.
    no_best = cli_here("eval", f"policy={teacher.with_name('best.pt')}")
    assert no_best.returncode == 2 and f"made none; its final weights are policy={teacher}" in no_best.stderr, no_best.stderr
    no_head = cli_here("eval", f"policy={teacher}", "env.max_episode_steps=20", "sampler=consistency", "steps=1")
    assert no_head.returncode == 2 and "robodistill distill teacher=" in no_head.stderr

    heads = {}
    for variant in ("regression", "consistency"):
        r = cli("distill", f"teacher={teacher}", f"variant={variant}", "iterations=20", "checkpoint_every=10",
                "batch_size=16", "eval_episodes=1", "threads=1", f"name={variant}")
        assert r.returncode == 0, r.stderr[-3000:]
        assert "consistency head, 1 step, on PushCube-v1 (1 episode, seed 10000)" in r.stdout  # held-out seeds, said
        (path,) = (tmp_path / "runs" / "distill").glob(f"*-{variant}")
        heads[variant] = path / "checkpoints" / "last.pt"
        saved = checkpoints.load(heads[variant])
        assert saved["consistency"]["step"] == 20 and saved["ema"].keys() == checkpoints.load(teacher)["ema"].keys()
        moved = [k for k, v in saved["consistency"]["weights"].items() if not torch.equal(v, saved["ema"]["denoiser." + k.removeprefix("network.")])]
        assert moved  # the head was trained away from its warm start

    # A one-step chain has no state inside it to learn from: its head learns from the start of the chain alone.
    one = cli("distill", f"teacher={teacher}", "teacher_steps=1", "iterations=2", "batch_size=16", "eval_episodes=0",
              "threads=1", "name=one")
    assert one.returncode == 0, one.stderr[-3000:]
    zero = cli_here("distill", f"teacher={teacher}", "teacher_steps=0", "name=zero")
    assert zero.returncode == 2 and "teacher_steps=0 must be between 1 and the teacher's 100 training timesteps" in zero.stderr, zero.stderr

    more = cli("distill", f"teacher={teacher}", "variant=regression", "iterations=30", "batch_size=16",
               "eval_episodes=0", "threads=1", "name=regression", "resume=true")
    assert more.returncode == 0 and "at iteration 20" in more.stdout, more.stderr[-3000:]
    runs = set((tmp_path / "runs" / "distill").iterdir())
    done = cli("distill", f"teacher={teacher}", "variant=regression", "iterations=30", "batch_size=16",
               "eval_episodes=0", "threads=1", "name=regression", "resume=true")  # a finished run: nothing to do
    assert done.returncode == 2 and "at iteration 30: the run already trained iterations=30" in done.stderr, done.stderr[-2000:]
    spent = cli_here("distill", f"teacher={teacher}", "variant=regression", "iterations=40", "batch_size=16",
                     "eval_episodes=0", "threads=1", "name=regression", "resume=true", "minutes=0.0001")  # its time used up
    assert spent.returncode == 2 and "the run already used minutes=0.0001 (training time adds up" in spent.stderr, spent.stderr[-2000:]
    assert set((tmp_path / "runs" / "distill").iterdir()) == runs  # and no empty run directory

    for sampler, used in (("sampler=consistency steps=3", "consistency 3 steps"), ("sampler=rti rti.timesteps=[2,0]", "rti 2 steps [2, 0]"),
                          ("sampler=consistency", "consistency 1 step")):  # no steps: the head's one, not the checkpoint's ddim 10
        r = cli("eval", f"policy={heads['consistency']}", "env.max_episode_steps=20", "episodes=2", *sampler.split())
        assert r.returncode == 0 and f"sampler {used} on PushCube-v1" in r.stdout, r.stderr[-3000:]
    listed = cli_here("summary")  # which tail of the timesteps RTI ran is part of what was rated
    assert listed.returncode == 0 and ", rti 2 steps [2, 0])" in listed.stdout, listed.stdout
    listed = cli_here("summary", "--name", "consistency")  # the distill run that rated its head
    assert re.search(r"consistency head: 20 iterations in .* min, 1 step: success_once \d+% \[\d+%, \d+%\] \([01]/1\)", listed.stdout), listed.stdout
    unused = cli_here("eval", f"policy={heads['consistency']}", "env.max_episode_steps=20", "episodes=1", "rti.timesteps=[2,0]")
    assert unused.returncode == 0 and "rti.timesteps: not used, this run samples no rti (add sampler=rti)" in unused.stdout, unused.stderr

    bench = cli("bench-latency", f"ckpt={heads['regression']}", "env.max_episode_steps=20", "episodes=1", "calls=5", "name=b")
    assert bench.returncode == 0, bench.stderr[-3000:]
    (out,) = (tmp_path / "runs" / "bench-latency").glob("*-b")
    rows = json.loads((out / "latency.json").read_text())
    assert [r["sampler"] for r in rows] == ["ddpm:100", "ddim:10", "rti", "consistency:1", "consistency:3"]
    assert [r["denoiser_calls"] for r in rows] == [100, 10, 3, 1, 3]
    assert all(0 <= r["success_once"] <= 1 and r["p50_ms"] > 0 for r in rows) and (out / "latency.png").stat().st_size > 0
    # One table, printed row by row as measured, naming the run whole (2026-12-05_19-15-05-regression: 30 characters).
    table = [line for line in bench.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(rows) and all(f"| {rows[0]['checkpoint']} |" in line for line in table[1:]), bench.stdout
    listed = [result for command, _, result in summarize(tmp_path / "runs") if command == "bench-latency"]
    assert [line.split(",")[0].split()[-2:] for line in listed] == [["100", "calls"], ["10", "calls"], ["3", "calls"], ["1", "call"], ["3", "calls"]], listed
    bad = cli_here("distill", "teacher=nothing.pt")
    assert bad.returncode == 2 and "teacher='nothing.pt'" in bad.stderr
    bad = cli_here("bench-latency", "ckpt=nothing.pt")
    assert bad.returncode == 2 and "ckpt 'nothing.pt' is neither" in bad.stderr, bad.stderr
    unused = cli_here("bench-latency", f"ckpt={heads['regression']}", "samplers=[ddim:2]", "rti.timesteps=[5,0]", "episodes=0",
                      "calls=2", "name=unused")  # rti settings for a run without rti: not ignored in silence
    assert unused.returncode == 0 and "rti.timesteps: not used, this run samples no rti (add rti to samplers=)" in unused.stdout, unused.stderr
    bad = cli_here("bench-latency", f"ckpt={heads['regression']}", "samplers=[]")
    assert bad.returncode == 2 and "samplers= is empty: give at least one name[:steps]" in bad.stderr, bad.stderr
    bad = cli_here("bench-latency", f"ckpt={out}")  # a run's folder, not the checkpoint in it
    assert bad.returncode == 2 and "is a folder, but neither an export bundle" in bad.stderr, bad.stderr
    bad = cli_here("eval", f"policy={heads['regression'].parent.parent}")  # a distill run: its checkpoint is named
    assert bad.returncode == 2 and f"this one holds policy={heads['regression']}" in bad.stderr, bad.stderr
    with pytest.raises(UserError, match="'foo' is not name"):  # said before the first sampler's minutes, not after
        measure(str(heads["regression"]), EnvConfig(), ["ddim:2", "foo"], RTIConfig(), calls=2, episodes=1)
    with pytest.raises(UserError, match="steps=1, 2 or 3"):
        policy = _policy()
        policy.consistency = ConsistencyHead.from_denoiser(policy.denoiser)
        policy.set_sampler("consistency", 5)


def test_distill_killed_in_its_final_evaluation_resumes_and_evaluates_again(cli, tmp_path, teacher_run, monkeypatch):
    from robodistill.training import distill

    cfg = distill.DistillConfig(teacher=str(run_dir(tmp_path, "t") / "checkpoints" / "last.pt"), variant="regression",
                                iterations=20, checkpoint_every=10, batch_size=16, eval_episodes=1, threads=1, device="cpu")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # stands for the SIGKILL: nothing after the evaluation runs

    monkeypatch.setattr(distill, "evaluate", killed)
    with pytest.raises(KeyboardInterrupt):
        distill.train(cfg, tmp_path / "killed")
    assert checkpoints.load(tmp_path / "killed" / "checkpoints" / "last.pt")["consistency"]["step"] == 10
    monkeypatch.undo()
    resumed = distill.train(replace(cfg, resume_from=str(tmp_path / "killed")), tmp_path / "resumed")
    assert resumed["step"] == 20 and "consistency_1" in resumed
    assert checkpoints.load(tmp_path / "resumed" / "checkpoints" / "last.pt")["consistency"]["step"] == 20


def test_distill_resume_goes_on_with_the_runs_own_settings_and_applies_the_ones_given(cli, cli_here, tmp_path, teacher_run):
    teacher = run_dir(tmp_path, "t") / "checkpoints" / "last.pt"
    first = cli("distill", f"teacher={teacher}", "variant=consistency", "target_decay=0.9", "iterations=10", "checkpoint_every=5",
                "batch_size=16", "eval_episodes=0", "threads=1", "name=c")
    assert first.returncode == 0, first.stderr[-3000:]
    # `resume=true` alone: the run's teacher, variant and settings, not the defaults' (teacher='' was refused as missing);
    # the learning rate given reaches the optimizer, where the checkpoint's used to win while the config recorded the given one.
    more = cli("distill", "name=c", "resume=true", "iterations=20", "lr=3e-4", "threads=1")
    assert more.returncode == 0 and "at iteration 10" in more.stdout, more.stderr[-3000:]
    assert (f"as the resumed run was trained: teacher={teacher} variant=consistency target_decay=0.9 batch_size=16 eval_episodes=0 "
            "checkpoint_every=5") in more.stdout, more.stdout
    done = checkpoints.load(sorted((tmp_path / "runs" / "distill").glob("*-c"))[-1] / "checkpoints" / "last.pt")["consistency"]
    assert done["step"] == 20 and done["config"]["batch_size"] == 16 and done["target_ema"]["decay"] == 0.9
    assert done["optimizer"]["param_groups"][0]["initial_lr"] == done["lr_schedule"]["base_lrs"][0] == 3e-4
    other = cli_here("distill", f"resume_from={teacher}", "iterations=20")  # a teacher, not a distill run
    assert other.returncode == 2 and f"{teacher} holds no distilled head, so no distill run's state" in other.stderr, other.stderr[-2000:]


def test_distill_finds_the_teachers_dataset_from_another_directory(cli, tmp_path, pushcube_demos):
    # the teacher recorded dataset=data/<file> as given, so distill run anywhere but there could not find it
    (tmp_path / "data").mkdir()
    for suffix in (".h5", ".json"):
        shutil.copy(pushcube_demos.with_suffix(suffix), tmp_path / "data" / pushcube_demos.with_suffix(suffix).name)
    train = cli("train-teacher", f"dataset=data/{pushcube_demos.name}", *TINY, "iterations=4", "eval_every=0", "eval_episodes=0", "name=t")
    assert train.returncode == 0, train.stderr[-3000:]
    teacher = run_dir(tmp_path, "t") / "checkpoints" / "last.pt"
    (tmp_path / "elsewhere").mkdir()
    r = run_cli("distill", f"teacher={teacher}", "iterations=2", "batch_size=8", "eval_episodes=0", "threads=1", cwd=tmp_path / "elsewhere")
    assert r.returncode == 0, r.stderr[-2000:]


def test_distill_refuses_images_of_another_size_than_the_teachers(cli_here, tmp_path, pickcube_rgb_demos, pickcube_rgb_teacher):
    import h5py

    # The teacher's 48 px demos at half the size: its CNN took them, and the head was fitted on them without a word.
    small = tmp_path / "small.h5"
    shutil.copy(pickcube_rgb_demos["path"], small)
    shutil.copy(pickcube_rgb_demos["path"].replace(".h5", ".json"), small.with_suffix(".json"))
    with h5py.File(small, "r+") as f:
        for traj in f.values():
            camera = traj["obs/sensor_data/base_camera"]
            images = camera["rgb"][:, ::2, ::2]
            del camera["rgb"]
            camera["rgb"] = images
    teacher = pickcube_rgb_teacher.parents[2] / "teacher" / "checkpoints" / "last.pt"
    r = cli_here("distill", f"teacher={teacher}", f"dataset={small}", "iterations=2", "batch_size=8", "eval_episodes=0")
    assert r.returncode == 2 and "holds 24x24 px images, but the teacher saw 48 px ones (its env.image_size)" in r.stderr, r.stderr[-2000:]


def test_bench_latency_rates_a_sampler_as_eval_does_whatever_was_measured_before(cli, tmp_path, teacher_run, monkeypatch):
    """A sampler's episodes do not depend on calls= nor on the samplers measured before it: they are those
    `robodistill eval` runs with the same seed."""
    from robodistill.inference import latency

    teacher = run_dir(tmp_path, "t") / "checkpoints" / "last.pt"
    rated, evaluate = [], latency.evaluate
    monkeypatch.setattr(latency, "evaluate", lambda *args, **kw: rated.append(evaluate(*args, **kw)) or rated[-1])
    for calls, samplers in ((2, ["ddpm:5"]), (3, ["ddim:2", "ddpm:5"])):
        torch.manual_seed(0)  # where `bench-latency seed=0` starts
        measure(str(teacher), EnvConfig(max_episode_steps=20), samplers, RTIConfig(), calls=calls, episodes=2)
    alone, after = ([e["return"] for e in report.episodes] for report in (rated[0], rated[-1]))
    assert alone == after
    r = cli("eval", f"policy={teacher}", "episodes=2", "sampler=ddpm", "steps=5", "name=e")
    assert r.returncode == 0, r.stderr[-3000:]
    evaluated = json.loads((run_dir(tmp_path, "e", "eval") / "eval.json").read_text())["episodes"]
    assert alone == pytest.approx([e["return"] for e in evaluated], abs=1e-5)


def test_summary_lists_a_latency_only_bench(cli, tmp_path, teacher_run):
    """bench-latency episodes=0 (latency only) is a finished run, not an incomplete one."""
    bench = cli("bench-latency", f"ckpt={run_dir(tmp_path, 't') / 'checkpoints' / 'last.pt'}", "episodes=0", "calls=2",
                "samplers=[ddim:2]", "name=b")
    assert bench.returncode == 0, bench.stderr[-3000:]
    assert "no latency.png: it plots success against latency, and episodes=0 rates no success" in bench.stdout  # was unsaid
    (listed,) = [result for command, _, result in summarize(tmp_path / "runs") if command == "bench-latency"]
    assert re.fullmatch(r"ddim:2 +2 calls, p50 +[\d.]+ ms", listed), listed
    # a sweep job's checkpoint is named by its sweep and job, not by the job number alone ("0")
    job = tmp_path / "runs" / "train-teacher" / "2026-01-01_00-00-00-multirun" / "0" / "checkpoints"
    job.mkdir(parents=True)
    shutil.copy(run_dir(tmp_path, "t") / "checkpoints" / "last.pt", job)
    (row,) = measure(str(job / "last.pt"), EnvConfig(max_episode_steps=20), ["ddim:2"], RTIConfig(), calls=2, episodes=0)
    assert row["checkpoint"] == "2026-01-01_00-00-00-multirun/0"


def test_bench_latency_stopped_keeps_the_rows_it_measured(cli, tmp_path, teacher_run):
    proc = subprocess.Popen([*ROBODISTILL, "bench-latency", f"ckpt={run_dir(tmp_path, 't') / 'checkpoints' / 'last.pt'}", "episodes=0",
                             "calls=3000", "samplers=[ddim:1,ddpm:100]", "name=b"],  # ddpm:100 takes 3000 x 100 denoiser calls
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp_path / "runs" / "bench-latency").glob("*-b/latency.json")):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "interrupted", err[-2000:]
    (out,) = (tmp_path / "runs" / "bench-latency").glob("*-b/latency.json")
    assert [r["sampler"] for r in json.loads(out.read_text())] == ["ddim:1"]


@pytest.mark.parametrize("spread", [1.01, 1.5])  # latencies within a decade, and 5 decades apart (log axis)
def test_latency_plot_labels_stay_apart_when_samplers_are_close(spread):
    """Samplers of close latency and one success rate (0% or 100%, as tiny runs give): no label on another."""
    samplers = ["ddpm:100", "ddim:10", "rti", "consistency:1", "consistency:3"]
    rows = [{"task": task, "checkpoint": "last", "sampler": name, "p50_ms": 0.2 * spread**i * (1 if spread < 1.1 else 10**i),
             "success_once": 1.0, "ci95": [0.9, 1.0]} for i, name in enumerate(samplers) for task in ("PushCube-v1", "PickCube-v1")]
    fig = figure(rows)
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    texts = [t for t in ax.texts if t.get_text()]
    ticks = [t for t in ax.get_xticklabels() + ax.get_xticklabels(minor=True) if t.get_visible() and t.get_text()]
    assert len(texts) == len(rows)
    for group in (texts, ticks):
        boxes = [t.get_window_extent(renderer) for t in group]
        for i, a in enumerate(boxes):
            assert not any(a.overlaps(b) for b in boxes[i + 1:]), [t.get_text() for t in group]
    assert all(fig.bbox.contains(*box.p0) and fig.bbox.contains(*box.p1) for box in (t.get_window_extent(renderer) for t in texts))


def test_distill_whose_loss_diverges_ends_in_one_line_saving_nothing_of_it(tmp_path, pickcube_rgb_teacher):
    from robodistill.training.distill import DistillConfig, train

    cfg = DistillConfig(teacher=str(pickcube_rgb_teacher), iterations=60, batch_size=8, lr=1e30, warmup=0, eval_episodes=0, threads=1)
    with pytest.raises(UserError, match=r"^the training loss stopped being finite by iteration 50: training diverged at lr=1e\+30"):
        train(cfg, tmp_path / "run")  # trained on: a consistency head of NaN weights, saved as a finished run
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()
