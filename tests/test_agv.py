"""The AGV warehouse env and PPO + RND: real env, real training steps, no mocks."""

import json
import math
import re
from pathlib import Path

import gymnasium as gym
import imageio
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from robodistill import checkpoints
from robodistill.envs import EnvConfig, make_env
from robodistill.envs.agv import SCENES, TASK
from robodistill.envs.agv.batch import DT, GOAL_RADIUS, OBS_DIM, RAY_RANGE, RAYS, ray_box_distances, ray_circle_distances
from robodistill.envs.agv.scenes import FAR, get_scene, walls
from robodistill.errors import UserError
from robodistill.evaluation import evaluate
from robodistill.policies.random import RandomPolicy
from robodistill.summary import summarize
from robodistill.training.ppo_rnd import RND, Agent, AGVTrainConfig, check, combined_advantage, train
from tests.conftest import SlowPolicy


def agv(scene="complex_dynamic", num_envs=4, **kw):
    return make_env(EnvConfig(task=TASK, scene=scene, num_envs=num_envs, control_mode=None, **kw))


def random_actions(n, b, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).uniform(-1, 1, (n, b, 2)).astype(np.float32))


def rollout(env, seeds, actions):
    obs = [env.reset(seed=seeds)["state"]]
    rewards, dones = [], []
    for a in actions:
        o, r, te, tr, _ = env.step(a)
        obs.append(o["state"])
        rewards.append(r)
        dones.append(te | tr)
    return torch.stack(obs), torch.stack(rewards), torch.stack(dones)


@pytest.mark.parametrize("scene", list(SCENES))
def test_same_seed_same_episodes_other_seed_other_layout(scene):
    acts = random_actions(250, 3)
    a, b = rollout(agv(scene, 3), [5, 6, 7], acts), rollout(agv(scene, 3), [5, 6, 7], acts)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)
    assert a[2].any(), "250 random steps should finish some episode (auto-reset covered)"
    other = rollout(agv(scene, 3), [8, 9, 10], acts[:1])
    assert not torch.equal(a[0][0], other[0][0])


def test_vectorized_equals_single_env_stepping():
    seeds, n = [11, 12, 13], 300
    acts = random_actions(n, len(seeds), seed=1)
    obs, rewards, dones = rollout(agv("complex_dynamic", len(seeds)), seeds, acts)
    for i, seed in enumerate(seeds):
        single = gym.make(TASK, scene="complex_dynamic")
        o, _ = single.reset(seed=seed)
        np.testing.assert_array_equal(o, obs[0, i].numpy())
        for t in range(n):
            o, r, te, tr, info = single.step(acts[t, i].numpy())
            assert r == pytest.approx(rewards[t, i].item()) and (te or tr) == dones[t, i].item()
            if te or tr:
                assert set(info) >= {"success_once", "collision", "path_length", "time_to_goal"}
                o, _ = single.reset()  # the batch auto-resets the same way: the robot's generator continues
            np.testing.assert_array_equal(o, obs[t + 1, i].numpy())
    assert dones.any()


def test_unseeded_single_envs_drive_different_layouts_and_a_seed_still_repeats():
    # gym.make_vec (and SB3's make_vec_env) reset their copies without a seed: each must get its own layouts
    vec = gym.make_vec(TASK, num_envs=3, scene="simple_static")
    obs, _ = vec.reset()
    goals = {tuple(batch.goal[0]) for batch in vec.get_attr("batch")}
    assert len(goals) == 3, goals
    assert len({tuple(o) for o in obs}) == 3
    a, b = gym.make(TASK, scene="simple_static"), gym.make(TASK, scene="simple_static")
    np.testing.assert_array_equal(a.reset(seed=4)[0], b.reset(seed=4)[0])


def test_each_env_has_its_own_spaces_so_seeded_random_actions_repeat():
    # one Box shared by every env: seeding the second env's space reseeded the first's, whose draws then differed
    a, b = gym.make(TASK, scene="simple_static"), gym.make(TASK, scene="simple_static")
    vec = agv("simple_static", 2)
    for space in (a.action_space, b.action_space, vec.single_action_space):
        space.seed(0)
    draws = [space.sample() for space in (a.action_space, b.action_space, vec.single_action_space)]
    np.testing.assert_array_equal(draws[0], draws[1])
    np.testing.assert_array_equal(draws[0], draws[2])


def test_gym_make_after_importing_robodistill_envs_and_bad_actions_are_refused():
    import subprocess
    import sys

    # A fresh interpreter: this test module has imported the AGV package already, which registered it then.
    code = ("import gymnasium as gym, robodistill.envs; "
            f"env = gym.make('{TASK}', scene='simple_static'); print(env.reset(seed=0)[0].shape)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == f"({OBS_DIM},)", r.stderr[-2000:]

    single = gym.make(TASK, scene="simple_static")
    single.reset(seed=0)
    with pytest.raises(ValueError, match=r"shape \(2,\).*got \(3,\)"):
        single.step(np.zeros(3))
    with pytest.raises(ValueError, match="must be finite"):
        single.step([np.nan, 0.0])
    env = agv("simple_static", 2)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"shape \(2, 2\).*got \(2, 3\)"):
        env.step(torch.zeros(2, 3))


def test_single_env_works_under_gymnasiums_episode_statistics_and_time_limit():
    # CleanRL-style wrapping: RecordEpisodeStatistics owns info["episode"], and gym.make's
    # max_episode_steps adds a TimeLimit over the env; the env's own metrics must survive both.
    env = gym.wrappers.RecordEpisodeStatistics(gym.make(TASK, scene="simple_static", max_episode_steps=5))
    env.reset(seed=0)
    for t in range(1, 6):
        _, _, terminated, truncated, info = env.step(np.array([0.0, 0.0], dtype=np.float32))
        assert info["episode_len"] == t and not terminated
    assert truncated and info["episode"]["l"] == 5 and info["success_once"] is False
    assert info["path_length"] > 0 and info["return"] == pytest.approx(info["episode"]["r"])


def test_time_to_goal_of_an_episode_gym_makes_time_limit_cuts_is_censored_at_that_limit():
    # the env could not see gym.make's TimeLimit and censored at the scene's 200 steps: 20 s for a 0.7 s episode
    for make in (lambda: gym.make(TASK, scene="simple_static", max_episode_steps=7),
                 lambda: gym.make(gym.make(TASK, scene="simple_static", max_episode_steps=7).spec)):  # remade from its spec
        env = make()
        env.reset(seed=0)
        for _ in range(7):
            _, _, terminated, truncated, info = env.step(np.array([-1.0, 1.0], dtype=np.float32))  # circles in place
        assert truncated and not terminated and info["time_to_goal"] == pytest.approx(7 * DT)
    # a TimeLimit past the scene's own leaves the scene's: its episodes end there, censored there
    env = gym.make(TASK, scene="simple_static", max_episode_steps=500)
    env.reset(seed=0)
    for steps in range(1, 501):
        _, _, terminated, truncated, info = env.step(np.array([-1.0, 1.0], dtype=np.float32))
        if terminated or truncated:
            break
    assert truncated and steps == get_scene("simple_static").max_steps and info["time_to_goal"] == pytest.approx(steps * DT)


def test_lidar_hits_known_walls_and_movers_at_known_distances():
    rects = np.concatenate([walls(8.0), np.full((3, 4), FAR)])[None]
    origin = np.array([[2.0, 3.0]])
    dirs = np.array([[[-1.0, 0.0], [0.0, -1.0], [1.0, 0.0], [0.0, 1.0], [-math.sqrt(0.5), -math.sqrt(0.5)]]])
    got = ray_box_distances(origin, dirs, rects, RAY_RANGE)[0]
    np.testing.assert_allclose(got, [2.0, 3.0, RAY_RANGE, RAY_RANGE, 2.0 * math.sqrt(2)], atol=1e-9)
    circle = ray_circle_distances(origin, dirs[:, :1], np.array([[[0.5, 3.0]]]), 0.3, RAY_RANGE)
    np.testing.assert_allclose(circle[0], [1.2], atol=1e-9)
    # Through the env: robot at (2, 3) facing -x; ray 8 of 16 points straight ahead at the wall.
    env = agv("simple_static", 1)
    env.reset(seed=0)
    env.batch.rects[0] = rects[0]
    env.batch.pos[0], env.batch.theta[0] = (2.0, 3.0), math.pi
    rays = env.batch.observe()[0, :RAYS] * RAY_RANGE
    assert rays[RAYS // 2] == pytest.approx(2.0) and rays[0] == pytest.approx(RAY_RANGE)


def place(env, pos, theta, goal):
    """Put robot 0 alone in the arena (walls only), still, at pos facing theta."""
    b = env.batch
    b.rects[0] = np.concatenate([walls(b.scene.size), np.full((b.scene.slots - 4, 4), FAR)])
    b.pos[0], b.theta[0], b.goal[0], b.v[0], b.w[0] = pos, theta, goal, 0.0, 0.0


def drive_forward(env, steps=30):
    for _ in range(steps):
        obs, reward, terminated, truncated, info = env.step(torch.tensor([[1.0, 0.0]]))
        if terminated[0] or truncated[0]:
            return reward[0].item(), terminated[0].item(), info
    raise AssertionError("the episode did not end")


@pytest.mark.parametrize("penalty, reward_mode, expected", [(None, "sparse", -1.0), (0.1, "sparse", -0.1), (0.0, "dense", None)])
def test_collision_ends_episode_with_penalty(penalty, reward_mode, expected):
    env = agv("simple_static", 1, collision_penalty=penalty, reward_mode=reward_mode)
    env.reset(seed=0)
    place(env, (1.0, 4.0), math.pi, goal=(6.0, 4.0))  # 0.75 m of free floor ahead, then the wall
    reward, terminated, info = drive_forward(env)
    ep = info["final_info"]["episode"]
    # dense: the last step's shaping only (driving away from the goal, a 0.1 m step at most), no penalty
    assert terminated and (reward == pytest.approx(expected) if expected is not None else -0.011 < reward < 0)
    assert ep["collision"][0] and not ep["success_once"][0]
    assert 0.7 < ep["path_length"][0] < 1.0 and info["final_observation"]["state"][0, RAYS // 2] * RAY_RANGE < 0.3


def test_reaching_goal_gives_success_and_reward():
    env = agv("simple_static", 1)
    env.reset(seed=0)
    place(env, (2.0, 4.0), 0.0, goal=(4.0, 4.0))
    reward, terminated, info = drive_forward(env)
    ep = info["final_info"]["episode"]
    assert terminated and reward == 1.0 and ep["success_once"][0] and not ep["collision"][0]
    assert ep["time_to_goal"][0].item() == pytest.approx(ep["episode_len"][0].item() * 0.1)
    assert ep["path_length"][0] == pytest.approx(2.0 - GOAL_RADIUS, abs=0.1)


def tiny(tmp_path, **kw):
    base = dict(scene="simple_dynamic", num_envs=4, num_steps=32, total_steps=256, eval_episodes=4,
                eval_every=0, obs_norm_init_steps=5, progress=False)
    return AGVTrainConfig(**{**base, **kw})


def test_ppo_rnd_updates_change_parameters_and_intrinsic_normalizer(tmp_path, capsys):
    cfg = tiny(tmp_path, total_steps=300)
    result = train(cfg, tmp_path)
    # rounded down to whole updates without a word
    assert result["step"] == 256 and ("total_steps=300 trains 256 env steps: whole updates of num_envs * num_steps = 128"
                                      in capsys.readouterr().out)
    torch.manual_seed(cfg.seed)
    initial = Agent(21, 2, cfg.hidden).state_dict()
    ck = checkpoints.load(result["checkpoint"])
    changed = [k for k in initial if not torch.equal(initial[k], ck["agent"][k])]
    assert {"actor.mean.0.weight", "critic.0.weight", "v_int.weight"} <= set(changed)
    assert ck["int_rms"]["count"] > 1 and ck["int_rms"]["var"].item() != 1.0
    assert ck["obs_rms"]["count"] > 1
    assert (tmp_path / "policy.pt").is_file() and any((tmp_path / "tb").iterdir())


def test_rnd_predictor_loss_is_the_canonical_mean_over_features():
    """PPO and the predictor share one gradient-norm clip: a loss summed over RND's 64 output features made the
    predictor's gradient norm ~16x the policy's at the start, so the clip shrank the first policy updates ~15-fold."""
    rnd = RND(obs_dim=21, hidden=64, out=64)
    obs = torch.randn(32, 21)
    expected = torch.nn.functional.mse_loss(rnd.predictor(obs), rnd.target(obs), reduction="none").mean(-1)
    torch.testing.assert_close(rnd.error(obs), expected)


def test_each_video_ends_with_its_episode(tmp_path):
    """AGV episodes end at a collision or the goal, each at its own step, and the env then starts another."""
    with make_env(EnvConfig(task=TASK, scene="complex_static", num_envs=2, control_mode=None, max_episode_steps=60), render=True) as env:
        report = evaluate(RandomPolicy(env.action_low, env.action_high, seed=3), env, episodes=2, seed=0, progress=False,
                          video_dir=tmp_path, video_episodes=2)
    lengths = [e["episode_len"] for e in report.episodes]
    assert len(set(lengths)) == 2, lengths  # one ended before the other: the case to check
    # Its reset state and the state after each step, the collision or arrival that ended it included.
    assert [len(imageio.mimread(tmp_path / f"episode_{k:03d}.mp4")) for k in range(2)] == [n + 1 for n in lengths]


def test_resume_continues_at_the_same_step(tmp_path):
    batch = 4 * 32
    first = train(tiny(tmp_path, algo="ppo", total_steps=2 * batch, checkpoint_every=1, eval_every=1), tmp_path)
    assert first["step"] == 2 * batch
    saved = checkpoints.load(first["checkpoint"])
    second = train(tiny(tmp_path, algo="ppo", total_steps=3 * batch, checkpoint_every=1, eval_every=1, resume_from=str(tmp_path)), tmp_path)
    assert second["step"] == 3 * batch
    assert [h["step"] for h in second["history"]] == [0, batch, 2 * batch, 3 * batch]
    resumed = checkpoints.load(second["checkpoint"])
    assert resumed["update"] == saved["update"] + 1 == 3
    assert resumed["obs_rms"]["count"] > saved["obs_rms"]["count"]


def test_resume_with_another_update_size_or_network_is_refused(tmp_path):
    """The checkpoint counts updates of num_envs * num_steps env steps and holds one intrinsic return per robot:
    another num_envs crashed mid-rollout (RND) or, with the budget reached in bigger updates, claimed steps never trained."""
    batch = 4 * 32
    train(tiny(tmp_path, total_steps=batch, checkpoint_every=1), tmp_path / "first")
    for field, value in (("num_envs", 8), ("num_steps", 16), ("hidden", 32)):
        with pytest.raises(UserError, match=f"is a run of algo=ppo_rnd scene=simple_dynamic {field}=.*: drop {field}= to continue"):
            train(tiny(tmp_path, total_steps=4 * batch, resume_from=str(tmp_path / "first"), **{field: value}), tmp_path / field)


def test_a_run_killed_writing_its_policy_resumes_and_writes_it(tmp_path, monkeypatch):
    batch = 4 * 32
    save = checkpoints.save

    def killed_at_the_policy(path, payload):
        if Path(path).name == "policy.pt":
            raise KeyboardInterrupt  # stands for the SIGKILL: nothing after it is written
        return save(path, payload)

    monkeypatch.setattr(checkpoints, "save", killed_at_the_policy)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(tmp_path, algo="ppo", total_steps=2 * batch, checkpoint_every=1), tmp_path / "killed")
    assert checkpoints.load(tmp_path / "killed" / "checkpoints" / "last.pt")["update"] == 1
    monkeypatch.undo()
    resumed = train(tiny(tmp_path, algo="ppo", total_steps=2 * batch, checkpoint_every=1, resume_from=str(tmp_path / "killed")),
                    tmp_path / "resumed")
    assert resumed["step"] == 2 * batch and checkpoints.load(resumed["policy"])["step"] == 2 * batch
    assert checkpoints.load(resumed["checkpoint"])["update"] == 2


def test_a_killed_run_resumes_exactly_where_it_would_have_been(tmp_path, monkeypatch):
    """The checkpoint holds the robots' episodes as they stood: a resumed run started fresh ones (seeded by the update),
    so it trained on other episodes than the run it continued would have, and ended elsewhere."""
    batch = 4 * 32
    straight = train(tiny(tmp_path, total_steps=3 * batch, checkpoint_every=1), tmp_path / "straight")
    save = checkpoints.save

    def killed_at_the_policy(path, payload):
        if Path(path).name == "policy.pt":
            raise KeyboardInterrupt  # stands for a SIGKILL after the checkpoint at update 2
        return save(path, payload)

    monkeypatch.setattr(checkpoints, "save", killed_at_the_policy)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(tmp_path, total_steps=3 * batch, checkpoint_every=1), tmp_path / "killed")
    monkeypatch.undo()
    resumed = train(tiny(tmp_path, total_steps=3 * batch, checkpoint_every=1, resume_from=str(tmp_path / "killed")), tmp_path / "resumed")
    ends = [checkpoints.load(run["checkpoint"]) for run in (straight, resumed)]
    assert ends[0]["update"] == ends[1]["update"] == 3
    for key in ("agent", "rnd"):
        for name, tensor in ends[0][key].items():
            torch.testing.assert_close(tensor, ends[1][key][name], rtol=0, atol=0, msg=f"{key}.{name}")
    assert resumed["history"] == straight["history"]


@pytest.mark.parametrize("field, value, message", [("scene", "warehouse", "unknown scene"), ("algo", "sac", "unknown algo"),
                                                   ("combine", "max", "unknown combine"),
                                                   ("reward_mode", "shaped", "unknown reward_mode 'shaped'. Valid: sparse, dense"), ("total_steps", 10, "less than one update"),
                                                   ("collision_penalty", -1.0, "collision_penalty must be >= 0"),
                                                   ("num_envs", 0, "num_envs=0 must be >= 1"),
                                                   # torch's traceback (lr), or trained on quietly (the others)
                                                   ("lr", -1.0, "lr=-1.0 must be > 0"), ("gamma", 1.5, "gamma=1.5 must be in \\[0, 1\\]"),
                                                   ("gae_lambda", -1.0, "gae_lambda=-1.0 must be in \\[0, 1\\]"),
                                                   ("clip_coef", -1.0, "clip_coef=-1.0 must be > 0"),
                                                   ("eval_episodes", 0, "eval_episodes=0 must be >= 1 \\(the run rates its final policy")])
def test_bad_training_input_is_a_user_error(field, value, message):
    with pytest.raises(UserError, match=message):
        check(AGVTrainConfig(**{field: value}))


def test_bad_env_input_is_a_user_error():
    with pytest.raises(UserError, match="unknown AGV scene 'nope'"):
        agv("nope")
    with pytest.raises(UserError, match="reward_mode 'shaped'"):
        agv("simple_static", reward_mode="shaped")
    with pytest.raises(UserError, match="env.collision_penalty must be >= 0"):
        agv("simple_static", collision_penalty=-1.0)
    for steps in (0, -3):  # as for ManiSkill tasks; 0 rated one-step episodes with a time to goal of 0 s
        with pytest.raises(UserError, match=rf"env.max_episode_steps must be >= 1 \(or null: the scene's own limit\), got {steps}"):
            agv("simple_static", max_episode_steps=steps)
    with pytest.raises(UserError, match="env.collision_penalty applies to robodistill/AGVWarehouse-v0 only, not to PushCube-v1"):
        make_env(EnvConfig(task="PushCube-v1", collision_penalty=0.5))
    with pytest.raises(UserError, match="env.obs_mode=rgb: robodistill/AGVWarehouse-v0 observes lidar ranges"):
        make_env(EnvConfig(task=TASK, obs_mode="rgb"))


def test_cli_trains_and_shared_eval_rates_the_policy_with_video(cli, cli_here, tmp_path):
    bad = cli("agv-train", "algo=sac")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == ["error: unknown algo 'sac'. Valid: ppo, ppo_rnd"]
    out = cli("agv-train", "scene=simple_static", "num_envs=4", "num_steps=32", "total_steps=128", "eval_episodes=2",
              "obs_norm_init_steps=2", "progress=false", "name=nav")
    assert out.returncode == 0, out.stderr
    # Resumed as the README says, as every training command resumes: the newest run of this name, whose own
    # scene and settings carry on; only total_steps is given. It goes on in a run directory of its own.
    more = cli("agv-train", "resume=true", "name=nav", "total_steps=256", "progress=false")
    assert more.returncode == 0 and "ppo_rnd on simple_static: 256 env steps" in more.stdout, more.stderr[-2000:]
    assert "checkpoints/last.pt at env step 128" in more.stdout, more.stdout
    assert ("as the resumed run was trained: scene=simple_static num_envs=4 num_steps=32 obs_norm_init_steps=2 eval_episodes=2 "
            "(set <field>= to change)") in more.stdout, more.stdout  # said as every training command says it
    first, run = sorted((tmp_path / "runs" / "agv-train").iterdir())
    assert checkpoints.load(run / "checkpoints" / "last.pt")["config"]["num_envs"] == 4
    kept = OmegaConf.load(run / ".hydra" / "config.yaml")  # the run's config says the settings it kept, as it ran
    assert (kept.scene, kept.num_envs, kept.total_steps) == ("simple_static", 4, 256)
    assert [h["step"] for h in json.loads((run / "history.json").read_text())] == [0, 128, 256]
    assert f"curves: {run / 'curves.png'}" in more.stdout and (run / "curves.png").stat().st_size > 10_000
    # Both runs' success curves in one PNG; runs that share a name are told apart by the overrides they differ in.
    from robodistill.curves import labels, series

    assert series(run, "nav")[1]["nav"][-1][:2] == (256, json.loads((run / "history.json").read_text())[-1]["success"])
    assert labels([(first.name, first), (run.name, run)]) == [
        "nav scene=simple_static num_envs=4 num_steps=32 total_steps=128 eval_episodes=2 obs_norm_init_steps=2",
        "nav total_steps=256"]
    pending = tmp_path / "runs" / "agv-train" / "2099-01-01_00-00-00-pending"  # one that has not evaluated yet
    pending.mkdir()
    both = cli("plot", str(first), str(run), str(pending), "--out", str(tmp_path / "both.png"))
    assert both.returncode == 0 and (tmp_path / "both.png").stat().st_size > 10_000, both.stderr[-2000:]
    assert f"{pending}: no evaluations yet, left out" in both.stdout
    text = cli_here("plot", str(run), "--out", str(tmp_path / "curves.txt"))
    assert text.returncode == 2 and "curves.txt: give a .png, .pdf or .svg file" in text.stderr, text.stderr[-2000:]
    lost = cli_here("plot", str(tmp_path / "runs"))
    assert lost.returncode == 2 and "is not the run directory of a training command" in lost.stderr, lost.stderr[-2000:]
    other = cli_here("agv-train", f"resume_from={first}", "total_steps=384", "scene=complex_static")
    assert other.returncode == 2 and "is a run of algo=ppo_rnd scene=simple_static" in other.stderr, other.stderr[-2000:]
    done = cli_here("agv-train", f"resume_from={run}")
    assert done.returncode == 2 and "at env step 256: the run already trained total_steps=256" in done.stderr, done.stderr[-2000:]
    # resume_from= without name=: the new run was named after the defaults' scene (ppo_rnd-complex_dynamic), so a later
    # resume=true name=nav found the older run and trained its steps again
    again = cli("agv-train", f"resume_from={first}", "total_steps=256", "progress=false")
    assert again.returncode == 0 and "ppo_rnd on simple_static: 256 env steps" in again.stdout, again.stderr[-2000:]
    assert [p.name[20:] for p in sorted((tmp_path / "runs" / "agv-train").iterdir())] == ["nav", "nav", "nav", "pending"]
    none = cli_here("agv-train", "resume=true", "name=elsewhere")
    assert none.returncode == 2 and "resume=true: no earlier run named 'elsewhere'" in none.stderr, none.stderr[-2000:]
    ev = cli("eval", f"policy={run / 'policy.pt'}", "env=agv", "env.num_envs=2",
             "episodes=2", "video=true", "video_episodes=1")
    assert ev.returncode == 0, ev.stderr
    assert "path length (m)" in ev.stdout and "time to goal (s)" in ev.stdout, ev.stdout
    (run,) = (tmp_path / "runs" / "eval").iterdir()
    assert run.name.endswith("-robodistill-AGVWarehouse-v0")  # the task id's "/" does not nest the run directory
    rated = json.loads((run / "eval.json").read_text())
    assert rated["env"]["scene"] == "simple_static"  # the scene the policy was trained in, not the config's default
    summary = rated["summary"]
    assert {"success_once", "collision", "mean_path_length", "mean_time_to_goal"} <= set(summary)
    assert (run / "videos" / "episode_000.mp4").is_file()
    (row,) = [r for r in summarize(tmp_path / "runs") if r[0] == "eval"]  # the AGV's rates, not "(incomplete run)"
    assert row[2].startswith("success_once ") and ", collision " in row[2], row
    # The warehouse also trains SB3 students (rpd, here without a teacher: plain PPO), rated by the same evaluation.
    student = cli("rpd", "env=agv", "env.scene=simple_static", "env.num_envs=4", "total_steps=256", "n_steps=64", "batch_size=64",
                  "obs_norm_steps=64", "eval_episodes=1", "progress=false", f"hydra.run.dir={tmp_path / 'rpd'}")
    assert student.returncode == 0 and (tmp_path / "rpd" / "student.zip").is_file(), student.stderr[-2000:]


def test_policy_exports_serves_and_drives_the_robot_through_the_controller(cli, tmp_path):
    from robodistill.deploy.controller import ChunkAgent, ControllerConfig
    from robodistill.deploy.export import ExportConfig, export
    from robodistill.envs.agv.batch import STOP_ACTION
    from robodistill.evaluation import evaluate
    from robodistill.policies import load_policy
    from robodistill.policies.bundle import Bundle, load_bundle_policy

    trained = train(tiny(tmp_path / "run", scene="simple_static", total_steps=512), tmp_path / "run")
    with pytest.raises(UserError, match="sampler/steps apply to diffusion and VLA checkpoints"):
        export(ExportConfig(ckpt=str(trained["policy"]), sampler="ddim", steps=7), tmp_path / "bundle")
    bundle, meta = export(ExportConfig(ckpt=str(trained["policy"]), format="onnx"), tmp_path / "bundle")
    assert meta["env"]["scene"] == "simple_static" and meta["policy"]["kind"] == "agv_ppo"
    assert meta["observation"] == {"state": {"shape": [1, 21], "dtype": "float32"}} and meta["noise"] is None

    with agv("simple_static", 2, max_episode_steps=40) as env:
        obs = env.reset(seed=[3, 4])
        for _ in range(5):
            obs = env.step(random_actions(1, 2)[0])[0]
        native, exported = load_policy(Path(trained["policy"]), env), load_bundle_policy(str(bundle), env)
        x = {"state": obs["state"][:, None]}
        torch.testing.assert_close(exported.predict_chunk(x), native.predict_chunk(x), atol=1e-5, rtol=0)
        here = evaluate(exported, env, 2, seed=0, progress=False).episodes

    # The same bundle behind the openpi-protocol server, driven by the controller: the same episodes.
    # At 10 Hz in real time, with a deadline no stall of a loaded test machine reaches: a late step would hold the last
    # action, and the episodes must match eval's step for step (a CI run once stalled 65 ms past the default 50 ms).
    loop = cli("control", f"bundle={bundle}", "episodes=2", "seed=0", "max_episode_steps=40", "deadline_ms=1000", "name=agv")
    assert loop.returncode == 0, loop.stderr[-3000:]
    (run,) = (tmp_path / "runs" / "control").iterdir()
    report = json.loads((run / "control.json").read_text())
    assert report["controller"]["hz"] == 10  # the rate the AGV was trained at, from the bundle (not a 20 Hz default)
    through = report["episodes"]
    assert [e["seed"] for e in through] == [e["seed"] for e in here] == [0, 1]
    for a, b in zip(through, here):
        assert (a["success_once"], a["collision"], a["episode_len"]) == (b["success_once"], b["collision"], b["episode_len"])
        assert a["return"] == pytest.approx(b["return"], abs=1e-6) and a["path_length"] == pytest.approx(b["path_length"], abs=1e-4)

    # No action in time: the controller sends the bundle's standstill command, which holds the robot where it is.
    loaded = Bundle.load(bundle)
    agent = ChunkAgent(SlowPolicy(loaded, delay=0.2), loaded.metadata, ControllerConfig(hz=20, deadline_ms=1, on_late="stop"))
    agent.reset()
    action = agent.get_action({"state": np.zeros(21, np.float32)})["actions"]
    np.testing.assert_allclose(action, STOP_ACTION)
    with agv("simple_static", 1) as env:
        env.reset(seed=[0])
        start = env.batch.pos.copy()
        for _ in range(20):
            env.step(torch.as_tensor(action)[None])
        assert np.abs(env.batch.pos - start).max() < 1e-6  # metres: float32 rounding of the command


@pytest.mark.parametrize("lr, scene", [(100.0, "simple_dynamic"), (1e30, "complex_dynamic")])
def test_training_that_diverges_ends_in_one_line(tmp_path, lr, scene):
    # the NaN weights' next rollout ended in torch's "Expected parameter scale ... found invalid values" traceback; at
    # lr=1e30 the weights stayed finite and the log std went to about -1e30 or 1e30, a std of 0 or inf: the same traceback
    with pytest.raises(UserError, match=r"^the policy's weights stopped being finite by env step \d+: training diverged at "
                                        + re.escape(f"lr={lr:g}: lower lr= and start again") + "$"):
        train(tiny(tmp_path, lr=lr, scene=scene, total_steps=1024), tmp_path)


def test_gae_bootstraps_only_where_the_episode_goes_on():
    from robodistill.training.advantages import gae

    # 2 steps x 2 envs; env 0's episode ends at step 0, env 1's runs on past the rollout. By hand (gamma 0.9, lambda 0.5):
    # env 0: A_1 = 0 + 0.9 * 1.0 - 0.2 = 0.7, A_0 = 1 - 0.5 = 0.5 (no bootstrap, nothing carried back from step 1)
    # env 1: A_1 = 2 + 0.9 * 4.0 - 0.3 = 5.3, A_0 = (0.9 * 0.3 - 0.1) + 0.9 * 0.5 * 5.3 = 2.555
    rewards, values = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[0.5, 0.1], [0.2, 0.3]])
    nonterminal = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    adv, returns = gae(rewards, values, torch.tensor([1.0, 4.0]), nonterminal, 0.9, 0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.5, 2.555], [0.7, 5.3]]))
    torch.testing.assert_close(returns, adv + values)


def test_the_policy_follows_2_a_ext_plus_1_a_int_with_two_value_heads():
    """RND's weights (Burda et al.), AGVTrainConfig's defaults: the task's advantage counts twice the novelty's."""
    adv_ext, adv_int = torch.tensor([1.0, 0.0, -1.0]), torch.tensor([0.0, 1.0, 3.0])
    torch.testing.assert_close(combined_advantage(AGVTrainConfig(), adv_ext, adv_int), torch.tensor([2.0, 1.0, 1.0]))
    torch.testing.assert_close(combined_advantage(AGVTrainConfig(ext_coef=0.5, int_coef=4.0), adv_ext, adv_int),
                               torch.tensor([0.5, 4.0, 11.5]))


def test_intrinsic_rewards_are_divided_by_the_running_std_of_their_discounted_returns_and_never_cut(tmp_path, monkeypatch):
    """Burda et al.'s normalisation, recomputed from the rollout's raw RND errors: the per-env forward filter
    R <- gamma_int R + r_i feeds the running variance, r_i is divided by its square root, and the intrinsic GAE
    bootstraps through episode ends, at gamma_int (here apart from gamma, so that swapping them shows)."""
    from robodistill.training import ppo_rnd

    raw, calls, error, real_gae = [], [], ppo_rnd.RND.error, ppo_rnd.gae

    def recorded_error(self, obs):
        out = error(self, obs)
        if not torch.is_grad_enabled():  # the rollout's rewards; the predictor's loss takes a gradient
            raw.append(out.clone())
        return out

    def recorded_gae(*args):
        calls.append([a.clone() if isinstance(a, torch.Tensor) else a for a in args])
        return real_gae(*args)

    monkeypatch.setattr(ppo_rnd.RND, "error", recorded_error)
    monkeypatch.setattr(ppo_rnd, "gae", recorded_gae)
    result = train(tiny(tmp_path, scene="complex_dynamic", num_envs=8, total_steps=256, gamma_int=0.9), tmp_path)  # one update
    r = torch.stack(raw)
    assert r.shape == (32, 8)
    returns, filtered = torch.zeros_like(r), torch.zeros(8)
    for t in range(32):
        filtered = 0.9 * filtered + r[t]
        returns[t] = filtered
    rms = ppo_rnd.RunningMeanStd()
    rms.update(returns.reshape(-1))
    torch.testing.assert_close(result["int_rms"]["var"], rms.var)
    (_, _, _, ext_nonterminal, gamma, _), (int_rewards, _, _, int_nonterminal, gamma_int, _) = calls
    assert (ext_nonterminal == 0).any()  # an episode ended in the rollout: the extrinsic GAE stops there
    torch.testing.assert_close(int_rewards, r / rms.var.sqrt())
    assert torch.equal(int_nonterminal, torch.ones(32, 8)) and (gamma, gamma_int) == (0.99, 0.9)


def test_observations_are_normalized_by_the_running_statistics_and_clipped_to_5():
    """What the policy, both value heads and RND's networks see (CleanRL's RND clips at 5): a lidar ray or goal
    distance far outside what the running statistics have seen stays an input the networks were trained near."""
    from robodistill.policies.agv import normalize

    obs = torch.tensor([[1.0, 100.0, -100.0, 3.0]])
    mean, var = torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.tensor([1.0, 4.0, 4.0, 4.0])
    torch.testing.assert_close(normalize(obs, mean, var), torch.tensor([[0.0, 5.0, -5.0, 1.0]]))


def test_a_time_out_bootstraps_v_ext_of_the_observation_the_episode_ended_on(tmp_path, monkeypatch):
    """An episode cut by the time limit was not failed: its last reward gets gamma V_ext(its final observation), which
    the env hands over in final_observation, its next observation being the new episode's reset state."""
    from dataclasses import replace

    from robodistill.training import ppo_rnd

    steps, raw, values, calls, made = [], {}, [], [], []
    make, norm, agent_values, real_gae = ppo_rnd.make_env, ppo_rnd.normalize, ppo_rnd.Agent.values, ppo_rnd.gae

    def short_episodes(cfg):  # the real env, its episodes cut at 10 steps so that a 32-step rollout holds time-outs
        env = make(replace(cfg, max_episode_steps=10))
        made.append(env)
        if len(made) == 1:  # the training env (the evaluation's comes second)
            step = env.step

            def recorded(action):
                out = step(action)
                steps.append((out[1].clone(), out[2].clone(), out[3].clone(), out[4]["final_observation"]["state"].clone() if out[4] else None))
                return out

            env.step = recorded
        return env

    def recorded_normalize(obs, mean, var):
        out = norm(obs, mean, var)
        raw[id(out)] = obs.clone()
        return out

    def recorded_values(self, obs):
        out = agent_values(self, obs)
        if not torch.is_grad_enabled():  # the rollout's; the update's take a gradient
            values.append((raw[id(obs)], out[0].clone()))
        return out

    def recorded_gae(*args):
        calls.append(args[0].clone())
        return real_gae(*args)

    monkeypatch.setattr(ppo_rnd, "make_env", short_episodes)
    monkeypatch.setattr(ppo_rnd, "normalize", recorded_normalize)
    monkeypatch.setattr(ppo_rnd.Agent, "values", recorded_values)
    monkeypatch.setattr(ppo_rnd, "gae", recorded_gae)
    train(tiny(tmp_path, scene="simple_static", algo="ppo", total_steps=128), tmp_path)  # one update, 4 envs x 32 steps
    rewards, asked, cut_steps = calls[0], iter(values), 0
    for t, (reward, terminated, truncated, final) in enumerate(steps[-32:]):  # after obs_norm_init_steps random ones
        next(asked)  # V of the observation the step acted on
        cut = truncated & ~terminated
        if not cut.any():
            torch.testing.assert_close(rewards[t], reward)
            continue
        cut_steps += 1
        seen, v_ext = next(asked)
        assert torch.equal(seen[cut], final[cut])
        torch.testing.assert_close(rewards[t], reward + 0.99 * cut * v_ext)
    assert cut_steps >= 2
