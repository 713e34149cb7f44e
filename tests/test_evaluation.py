import json
from dataclasses import replace

import imageio.v2 as imageio
import numpy as np
import pytest
import torch

from robodistill.envs import EnvConfig, make_env
from robodistill.evaluation import HELD_OUT_SEEDS, TRAINED_FIELDS, evaluate, take_env, wilson_interval
from robodistill.inference.chunks import ChunkExecutor
from robodistill.policies import RandomPolicy
from robodistill.policies.scripted import PushCubeScripted
from robodistill.training.rl100 import SEEDS
from tests.conftest import disk_full_past, relabeled_demos


@pytest.mark.parametrize(
    "k, n, lo, hi",
    [(0, 10, 0.0, 0.2775), (5, 10, 0.2366, 0.7634), (10, 10, 0.7225, 1.0), (45, 50, 0.7864, 0.9565)],
)
def test_wilson_interval_matches_reference_values(k, n, lo, hi):
    got = wilson_interval(k, n)
    assert got == pytest.approx((lo, hi), abs=1e-4)


def test_a_recorded_env_fills_what_the_command_line_leaves_unset(capsys):
    here = EnvConfig(task="PushCube-v1")
    pick = {"task": "PickCube-v1", "obs_mode": "rgb", "max_episode_steps": 30, "image_size": 48}
    resumed = ("task", *TRAINED_FIELDS)
    # A resumed run without env=: its own task and env, said once.
    assert take_env(here, pick, set(), resumed, who="the resumed run") == EnvConfig(
        task="PickCube-v1", obs_mode="rgb", max_episode_steps=30, image_size=48)
    assert capsys.readouterr().out.startswith("as the resumed run was trained: env.task=PickCube-v1 env.obs_mode=rgb")
    # What the command line sets stays; env=<task> sets the task, and another task's env is not taken.
    assert take_env(here, pick, {"env.max_episode_steps"}, resumed).max_episode_steps == here.max_episode_steps
    assert take_env(here, pick, {"env"}, resumed) == here
    # A policy rated on another task than its own (no "task" in the fields): unchanged, its loader names the mismatch.
    assert take_env(here, pick, set()) == here
    assert take_env(EnvConfig(task="PickCube-v1"), pick, set()).image_size == 48


def test_a_policy_for_another_env_is_refused_naming_the_settings_that_match(cli_here, pickcube_rgb_teacher):
    # "set env=... to match" sent the user to change the task, where the observation mode was what differed.
    r = cli_here("eval", f"policy={pickcube_rgb_teacher}", "env=PickCube-v1", "env.obs_mode=state", "episodes=1")
    assert r.returncode == 2 and "but the env is {'task': 'PickCube-v1', 'obs_mode': 'state'" in r.stderr, r.stderr[-2000:]
    assert r.stderr.rstrip().endswith(": set env.obs_mode=rgb"), r.stderr[-2000:]
    other = cli_here("eval", f"policy={pickcube_rgb_teacher}", "env=PushCube-v1", "env.obs_mode=state", "episodes=1")
    assert other.returncode == 2 and ": set env=PickCube-v1 env.obs_mode=rgb" in other.stderr, other.stderr[-2000:]


def test_a_policy_that_sees_images_is_refused_a_camera_of_another_size(cli_here, pickcube_rgb_teacher):
    # Its CNN pools over any image size: at 64 px it was rated (and taught RPD students) on images it never saw, unsaid.
    r = cli_here("eval", f"policy={pickcube_rgb_teacher}", "env=PickCube-v1", "env.image_size=64", "episodes=1")
    assert r.returncode == 2 and "'image_size': 48}, but the env is" in r.stderr, r.stderr[-2000:]
    assert r.stderr.rstrip().endswith(": set env.image_size=48"), r.stderr[-2000:]


class CountingPolicy:
    """Chunks whose actions encode (call number, position in chunk) so the order of execution shows."""

    obs_horizon = 2
    act_horizon = 2

    def __init__(self):
        self.calls = 0
        self.seen = []

    def predict_chunk(self, obs, streams=None):
        self.calls += 1
        self.seen.append(obs["state"].clone())
        b = obs["state"].shape[0]
        steps = torch.arange(4, dtype=torch.float32)  # pred horizon 4, only 2 executed
        return (self.calls * 10 + steps).view(1, 4, 1).expand(b, 4, 1)


def test_chunk_executor_receding_horizon_history_and_restart():
    policy = CountingPolicy()
    ex = ChunkExecutor(policy, num_envs=2)
    ex.observe({"state": torch.tensor([[1.0], [2.0]])})
    assert policy.seen == [] and ex.act().tolist() == [[10.0], [10.0]]
    torch.testing.assert_close(policy.seen[0], torch.tensor([[[1.0], [1.0]], [[2.0], [2.0]]]))  # padded history
    ex.observe({"state": torch.tensor([[3.0], [4.0]])}, torch.tensor([False, False]))
    assert ex.act().tolist() == [[11.0], [11.0]] and policy.calls == 1  # second action of the same chunk
    ex.observe({"state": torch.tensor([[5.0], [6.0]])}, torch.tensor([False, True]))  # env 1 restarts
    assert ex.act().tolist() == [[20.0], [20.0]] and policy.calls == 2
    torch.testing.assert_close(policy.seen[1], torch.tensor([[[3.0], [5.0]], [[6.0], [6.0]]]))
    ex.observe({"state": torch.tensor([[7.0], [8.0]])}, torch.tensor([False, True]))
    assert ex.act().tolist() == [[21.0], [30.0]]  # only env 1 re-planned
    assert policy.seen[2].shape[0] == 1


def test_scripted_expert_succeeds_and_random_fails_on_pushcube():
    with make_env(EnvConfig(task="PushCube-v1"), ignore_terminations=True) as env:
        rng = torch.get_rng_state()
        expert = evaluate(PushCubeScripted(), env, episodes=3, seed=0, progress=False)
        random = evaluate(RandomPolicy(env.action_low, env.action_high, seed=0), env, episodes=3, seed=0, progress=False)
        # The auto-resets draw from torch's global RNG; an evaluation inside training must leave it as it was.
        assert torch.equal(torch.get_rng_state(), rng)
    assert expert.summary["success_once"]["count"] == 3
    assert random.summary["success_once"]["count"] == 0
    assert expert.summary["mean_return"] > random.summary["mean_return"]
    assert [e["seed"] for e in expert.episodes] == [0, 1, 2]
    assert all(e["episode_len"] == 50 for e in expert.episodes)


def test_results_do_not_depend_on_number_of_envs(tmp_path):
    """Episode k is seeded seed + k, so one env and two workers report the same episodes."""
    with make_env(EnvConfig(task="PushCube-v1"), ignore_terminations=True) as env:
        one = evaluate(PushCubeScripted(), env, episodes=3, seed=7, progress=False)
    with make_env(EnvConfig(task="PushCube-v1", num_envs=2), ignore_terminations=True, render=True) as env:
        two = evaluate(PushCubeScripted(), env, episodes=3, seed=7, progress=False, video_dir=tmp_path, video_episodes=3)
    for a, b in zip(one.episodes, two.episodes):
        assert a["seed"] == b["seed"] and a["success_once"] == b["success_once"]
        assert a["return"] == pytest.approx(b["return"], abs=1e-3)
    videos = sorted(p.name for p in tmp_path.glob("*.mp4"))
    assert videos == ["episode_000.mp4", "episode_001.mp4", "episode_002.mp4"]
    frames = imageio.mimread(tmp_path / "episode_002.mp4")
    assert len(frames) == 51 and frames[0].shape == (256, 256, 3)  # the reset state and the state after each step
    path = two.save(tmp_path / "eval.json", policy="scripted")
    saved = json.loads(path.read_text())
    assert len(saved["episodes"]) == 3 and saved["summary"]["episodes"] == 3


def rendered_states(cfg: EnvConfig, seed: int, steps: int) -> np.ndarray:
    """(steps + 1, H, W, 3): the states a scripted episode of `cfg` with `seed` passes through, rendered after its reset
    and after each step, in an env whose episode limit is one step longer, so that no auto-reset replaces the last."""
    with make_env(replace(cfg, num_envs=1, max_episode_steps=steps + 1), ignore_terminations=True, render=True) as env:
        executor = ChunkExecutor(PushCubeScripted(), 1)
        executor.observe(env.reset(seed=[seed], rebuild=True))
        states = [env.render()[0]]
        for _ in range(steps):
            obs, *_ = env.step(executor.act())
            executor.observe(obs)
            states.append(env.render()[0])
    return np.stack(states)


def test_a_video_shows_its_episode_from_the_reset_state_to_the_last(tmp_path):
    """Frames were rendered before each step, and the env resets an episode inside the step that ends it: a video of
    T steps had T frames, and the last state, the one that shows the task solved or failed, was never filmed. (The
    worker processes' frames, num_envs=2, are counted in test_results_do_not_depend_on_number_of_envs.)"""
    steps = 5
    cfg = EnvConfig(task="PushCube-v1", max_episode_steps=steps, render_size=64)
    with make_env(cfg, ignore_terminations=True, render=True) as env:
        evaluate(PushCubeScripted(), env, episodes=1, seed=0, progress=False, video_dir=tmp_path, video_episodes=1)
    video = np.stack(imageio.mimread(tmp_path / "episode_000.mp4")).astype(np.float32)
    assert len(video) == steps + 1, len(video)
    # mp4 is lossy: each frame must be nearest to the state it is of, the last to the state after the last step.
    gaps = np.abs(video[:, None] - rendered_states(cfg, 0, steps)[None].astype(np.float32)).mean(axis=(2, 3, 4))
    assert gaps.argmin(axis=1).tolist() == list(range(steps + 1)), gaps.round(1)


def test_an_evaluation_rates_as_in_a_fresh_env():
    """CPU PhysX carries solver state from one episode into the next: the same seeds rated again in a used env
    gave other returns, so a resumed run's periodic evaluations differed from the uninterrupted run's."""
    with make_env(EnvConfig(task="PushCube-v1"), ignore_terminations=True) as env:
        first, again = (evaluate(PushCubeScripted(), env, episodes=4, seed=5, progress=False) for _ in range(2))
    assert [e["return"] for e in first.episodes] == [e["return"] for e in again.episodes]


def test_an_eval_json_the_disk_has_no_room_for_says_so_and_leaves_no_cut_short_file(tmp_path):
    # It was written in place: a traceback, and a cut-short eval.json that summary then failed to parse.
    from robodistill.errors import CutShort
    from robodistill.evaluation import EvalReport

    report = EvalReport([{"episode": k, "seed": k, "success_once": True, "return": 1.0} for k in range(100)], 1.0, 5000)
    with disk_full_past(2000), pytest.raises(CutShort, match=r"could not write .*eval.json: File too large \(there is no eval.json yet\)"):
        report.save(tmp_path / "eval.json")
    assert list(tmp_path.iterdir()) == []


def test_actions_not_finite_only_after_an_episode_ended_do_not_end_the_evaluation():
    # An AGV robot whose episode ended early steps on in an unrated one: its NaN action there was blamed on the finished
    # episode's seed (6) and ended the evaluation. This actor drives straight ahead and is NaN where the goal is 0.7 of
    # the arena or more away: in seed 6's and 7's episodes it never is, in the one robot 0 starts after its own it is.
    from robodistill.policies.agv import AGVPolicy, GaussianActor

    actor = GaussianActor(21, 2, 8)
    with torch.no_grad():
        for p in actor.parameters():
            p.zero_()
        first, last = actor.mean[0], actor.mean[-1]
        first.weight[0, 16], first.bias[0] = float("inf"), float("-inf")  # inf * d - inf: NaN for d >= 0, -inf below
        last.bias[0] = 1.0
    mean, var = torch.zeros(21), torch.ones(21)
    mean[16] = 0.7  # d = goal distance / arena size - 0.7
    with make_env(EnvConfig(task="robodistill/AGVWarehouse-v0", scene="simple_static", num_envs=2), ignore_terminations=True) as env:
        report = evaluate(AGVPolicy(actor, mean, var), env, 2, seed=6, progress=False)
    assert [(e["seed"], e["episode_len"]) for e in report.episodes] == [(6, 10), (7, 33)]


def test_a_policy_whose_actions_are_not_finite_is_one_clear_line():
    # a checkpoint with NaN weights (as a run that diverged leaves them) ended in ManiSkill's "Action cannot be NaN" traceback
    from robodistill.errors import UserError
    from robodistill.policies.diffusion import DiffusionConfig, DiffusionPolicy

    with make_env(EnvConfig(task="PushCube-v1", max_episode_steps=5), ignore_terminations=True) as env:
        policy = DiffusionPolicy(DiffusionConfig(mlp_hidden=[16]), env.single_observation_space["state"].shape[0], 4,
                                 env.action_low.cpu(), env.action_high.cpu()).eval()
        with torch.no_grad():
            for p in policy.denoiser.parameters():
                p.fill_(float("nan"))
        with pytest.raises(UserError, match=r"^the policy's actions are not finite \(NaN or inf\) in the episode with seed 7: "):
            evaluate(policy, env, 1, seed=7, progress=False)


def test_training_on_the_initial_states_a_run_rates_is_refused_before_it_trains(cli_here, pushcube_demos, tmp_path):
    rated = relabeled_demos(pushcube_demos, tmp_path / "rated", HELD_OUT_SEEDS)  # `demos seed=10000`: seeds 10000-10002
    tiny = ["policy.mlp_hidden=[64,64]", "env.max_episode_steps=20", "threads=1", "iterations=1", "val_fraction=0"]
    teacher = cli_here("train-teacher", f"dataset={rated}", *tiny, "eval_episodes=2", "name=t")
    assert teacher.returncode == 2 and (f"dataset {rated}: 2 of its episodes start from seeds that this run's evaluations rate "
                                        "(10000 to 10001): 10000, 10001; it would rate the initial states the policy learnt from: "
                                        "set seed=3 or more (evaluations start at 10,000 + seed)") in teacher.stderr, teacher.stderr[-2000:]
    assert not list(tmp_path.glob("runs/train-teacher/*/checkpoints"))  # refused before it trained
    # seeds whose evaluations clear the dataset's train, and so does a teacher that is never rated
    assert cli_here("train-teacher", f"dataset={rated}", *tiny, "eval_episodes=2", "seed=3", "name=t").returncode == 0
    unrated = cli_here("train-teacher", f"dataset={rated}", *tiny, "eval_episodes=0", "name=u")
    assert unrated.returncode == 0, unrated.stderr[-2000:]
    # distill rates a head that learnt the teacher's actions: the teacher's demonstrations count, not only its own dataset=
    (ckpt,) = tmp_path.glob("runs/train-teacher/*-u/checkpoints/last.pt")
    distill = cli_here("distill", f"teacher={ckpt}", f"dataset={pushcube_demos}", "iterations=1", "eval_episodes=3", "threads=1")
    assert distill.returncode == 2 and f"dataset {rated}: 3 of its episodes start from seeds that this run's evaluations rate" in distill.stderr, \
        distill.stderr[-2000:]
    rl100 = cli_here("rl100", "env=PushCube-v1", f"dataset={rated}", "eval_episodes=1")
    assert rl100.returncode == 2 and (f"dataset {rated}: 1 of its episodes start from seeds that this run rates its policies on "
                                      "(10000 to 10000): 10000; it would rate the initial states the policy learnt from: train on "
                                      "demonstrations planned from other seeds") in rl100.stderr, rl100.stderr[-2000:]
    collected = relabeled_demos(pushcube_demos, tmp_path / "collected", SEEDS["collect"][0] + 5)  # rl100's own training episodes'
    rl100 = cli_here("rl100", "env=PushCube-v1", f"dataset={collected}")
    assert rl100.returncode == 2 and "3 of its episodes start from seeds that this run collects offline rollouts from" in rl100.stderr
    assert not (tmp_path / "runs" / "rl100").exists() or not list(tmp_path.glob("runs/rl100/*/report.json"))
    # started from a policy (no stage reads a dataset): the policy's own demonstrations count
    rl100 = cli_here("rl100", "env=PushCube-v1", f"init={ckpt}", "stages=[online]", "eval_episodes=1")
    assert rl100.returncode == 2 and f"dataset {rated}: 1 of its episodes start from seeds that this run rates its policies on" in rl100.stderr, \
        rl100.stderr[-2000:]


def test_eval_says_how_many_episodes_start_from_the_policys_training_states(cli_here, pushcube_demos, tmp_path):
    train = cli_here("train-teacher", f"dataset={pushcube_demos}", "policy.mlp_hidden=[64,64]", "iterations=1", "eval_episodes=0",
                     "threads=1", "name=t")
    assert train.returncode == 0, train.stderr[-2000:]
    (ckpt,) = tmp_path.glob("runs/train-teacher/*-t/checkpoints/last.pt")
    limit = ["env.max_episode_steps=5", "sampler=ddim", "steps=2"]
    rated = cli_here("eval", f"policy={ckpt}", *limit, "seed=9", "episodes=3")  # seeds 9, 10, 11: the demos are 10, 11, 12
    assert rated.returncode == 0, rated.stderr[-2000:]
    assert (f"note: 2 of these 3 episodes start from initial states in the policy's training data ({pushcube_demos}): use "
            "seed=13 or more to rate held-out states") in rated.stdout, rated.stdout[-2000:]
    held_out = cli_here("eval", f"policy={ckpt}", *limit, "seed=13", "episodes=1")
    assert held_out.returncode == 0 and "note:" not in held_out.stdout, held_out.stdout[-2000:]
