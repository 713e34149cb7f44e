import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3 import PPO

from robodistill.envs import SUPPORTED_TASKS, EnvConfig, SB3View, make_env
from robodistill.envs.vector import AUTO_RESET_SEEDS
from robodistill.errors import CutShort, UserError


def rollout(env, steps, seeds):
    """Fixed action sequence (same for every env) -> stacked states."""
    obs = env.reset(seed=seeds)
    gen = torch.Generator().manual_seed(0)
    states = [obs["state"].clone()]
    for _ in range(steps):
        a = torch.rand(env.single_action_space.shape, generator=gen) * 2 - 1
        obs, *_ = env.step(a.expand(env.num_envs, -1))
        states.append(obs["state"].clone())
    return torch.stack(states, 1)


def test_state_convention_and_episode_end():
    with make_env(EnvConfig(task="PushCube-v1", max_episode_steps=5)) as env:
        assert env.max_episode_steps == 5 and env.control_freq == 20
        obs = env.reset(seed=[0])
        assert set(obs) == {"state"} and obs["state"].shape == (1, 35) and obs["state"].dtype == torch.float32
        for t in range(5):
            obs, reward, terminated, truncated, info = env.step(torch.zeros(1, 4))
            assert reward.shape == (1,) and terminated.shape == (1,) and truncated.shape == (1,)
        assert truncated.all() and info["_final_info"].all()
        ep = info["final_info"]["episode"]
        assert ep["episode_len"].item() == 5 and "success_once" in ep and "return" in ep
        assert info["final_observation"]["state"].shape == (1, 35)


def test_process_vector_env_matches_single_env_per_seed():
    """Two CPU workers give the same trajectories as one in-process env with the same seeds."""
    with make_env(EnvConfig(task="PickCube-v1", num_envs=2)) as env2:
        assert env2.num_envs == 2 and env2.device == torch.device("cpu")
        both = rollout(env2, 10, [11, 12])
    with make_env(EnvConfig(task="PickCube-v1")) as env1:
        first = rollout(env1, 10, [11])
        again = rollout(env1, 10, [11])
        second = rollout(env1, 10, [12])
    torch.testing.assert_close(first, again)
    torch.testing.assert_close(both[0], first[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(both[1], second[0], atol=1e-5, rtol=0)
    assert not torch.allclose(first[0, 0], second[0, 0])  # different seeds, different scenes


def test_process_vector_env_autoresets_with_final_info():
    with make_env(EnvConfig(task="PushCube-v1", num_envs=2, max_episode_steps=3), ignore_terminations=True) as env:
        obs = env.reset(seed=[0, 1])
        for _ in range(3):
            obs, reward, terminated, truncated, info = env.step(torch.zeros(2, 4))
        assert info["_final_info"].tolist() == [True, True]
        assert info["final_info"]["episode"]["episode_len"].tolist() == [3, 3]
        assert "success_at_end" in info["final_info"]["episode"]
        assert info["final_observation"]["state"].shape == (2, 35)
        assert not torch.equal(info["final_observation"]["state"], obs["state"])  # obs is the new episode


def test_process_vector_env_auto_resets_repeat_with_the_seed():
    # an auto-reset episode was laid out with the worker's torch RNG, seeded from the OS: rpd and rl100 runs with
    # env.num_envs > 1 and the same seed differed from their first auto-reset on
    runs = []
    for _ in range(2):
        with make_env(EnvConfig(task="PushCube-v1", num_envs=2, max_episode_steps=2)) as env:
            runs.append(rollout(env, 6, seeds=[0, 1]))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0][:, 3], runs[0][:, 5])  # each auto-reset starts a new episode


def test_process_vector_env_auto_resets_start_apart_from_every_rated_seed():
    # ManiSkill drew an auto-reset episode's seed in [0, 2 ** 31), where robodistill's evaluations rate (HELD_OUT_SEEDS on)
    with make_env(EnvConfig(task="PushCube-v1", num_envs=2, max_episode_steps=2)) as env:
        env.reset(seed=[10_000, 10_001])
        for _ in range(2):
            obs, *_ = env.step(torch.zeros(2, 4))
        seeds = [int(s[0]) for s in env._vec.get_attr("_episode_seed")]
    assert all(AUTO_RESET_SEEDS[0] <= s < AUTO_RESET_SEEDS[1] for s in seeds), seeds
    assert seeds[0] != seeds[1]
    with make_env(EnvConfig(task="PushCube-v1")) as env1:  # the seed is the episode's: its initial state is that seed's
        torch.testing.assert_close(env1.reset(seed=[seeds[1]])["state"][0], obs["state"][1], atol=1e-5, rtol=0)


def test_a_worker_process_that_dies_ends_the_run_in_one_line_and_stops_the_others():
    # a simulator crash or the out-of-memory killer: gymnasium raised EOFError from deep in the step, then again from close
    import os
    import signal

    env = make_env(EnvConfig(num_envs=2))
    env.reset(seed=0)
    workers = env._vec.processes
    os.kill(workers[1].pid, signal.SIGKILL)
    with pytest.raises(CutShort, match=rf"env worker 1 of 2 \(pid {workers[1].pid}\) was ended by SIGKILL \(the out-of-memory "
                                       r"killer, or a kill -9\) while running PushCube-v1; the other workers were stopped"):
        env.step(torch.zeros(2, 4))
    env.close()
    assert not any(p.is_alive() for p in workers)


def test_rgb_observations():
    with make_env(EnvConfig(task="PushCube-v1", obs_mode="rgb", image_size=64)) as env:
        obs = env.reset(seed=[0])
        assert set(obs) == {"state", "rgb"}
        assert obs["rgb"].shape == (1, 64, 64, 3) and obs["rgb"].dtype == torch.uint8
        assert obs["rgb"].float().std() > 0  # a real rendered image, not a blank
        obs, *_ = env.step(torch.zeros(1, 4))
        assert obs["rgb"].shape == (1, 64, 64, 3)


@pytest.mark.parametrize("task", SUPPORTED_TASKS)
def test_supported_task_builds_and_steps(task):
    with make_env(EnvConfig(task=task)) as env:
        obs = env.reset(seed=[0])
        assert obs["state"].ndim == 2 and torch.isfinite(obs["state"]).all()
        obs, reward, *_ = env.step(torch.zeros(1, *env.single_action_space.shape))
        assert torch.isfinite(reward).all()


@pytest.mark.parametrize(
    "cfg, message",
    [
        (dict(task="NoSuchTask-v9"), "Supported tasks: PushCube-v1"),
        (dict(task="PickSingleYCB-v1"), "needs downloaded assets (ycb)"),
        (dict(obs_mode="pointcloudz"), "Valid: state, rgb"),
        (dict(control_mode="pd_teleport"), "Valid: pd_joint_delta_pos, pd_joint_pos, pd_ee_delta_pos"),
        (dict(reward_mode="shaped"), "Valid: normalized_dense, dense, sparse, none"),
        (dict(sim_backend="physx_gpu"), "Valid: physx_cpu, physx_cuda"),
        (dict(sim_backend="physx_cuda:x"), "Valid: physx_cpu, physx_cuda, physx_cuda:<n> (GPU n)"),
        (dict(sim_backend="physx_cpu:0"), "unknown sim_backend 'physx_cpu:0'"),  # ManiSkill would drop the :0 unread
        (dict(num_envs=0), "num_envs must be >= 1"),
        (dict(colour="red"), "unknown env field(s) ['colour']"),
    ],
)
def test_bad_env_config_names_field_and_choices(cfg, message):
    with pytest.raises(UserError) as err:
        make_env(cfg)
    assert message in str(err.value)


def test_gpu_backend_refused_clearly_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the GPU path is checked by benchmarks/gpu_check.sh")
    for backend in ("physx_cuda", "physx_cuda:0"):
        with pytest.raises(UserError, match=f"sim_backend={backend} needs a CUDA GPU"):
            make_env(EnvConfig(sim_backend=backend, num_envs=16))


def test_gpu_simulation_runs_on_the_process_own_gpu(monkeypatch):
    """What ManiSkill is asked for: plain physx_cuda on torch's current CUDA device (each rank's own under torchrun:
    setup() sets it), rendering there too; SAPIEN would take a bare "physx_cuda" to its first GPU for every rank.
    CUDA stands in for what this machine lacks: a second GPU, current in this process, as on rank 1."""
    from robodistill.envs.factory import gym_kwargs

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    for given, gpu in (("physx_cuda", 1), ("physx_cuda:0", 0)):
        kwargs = gym_kwargs(EnvConfig(sim_backend=given, num_envs=4), 4, render=False)
        assert (kwargs["sim_backend"], kwargs["render_backend"]) == (f"physx_cuda:{gpu}", f"sapien_cuda:{gpu}")
    assert gym_kwargs(EnvConfig(), 1, render=False)["render_backend"] == "gpu"  # physx_cpu: SAPIEN picks its renderer


def test_one_gpu_for_every_rank_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it for each of 2 ranks
    with pytest.raises(UserError, match="env.sim_backend=physx_cuda:1 puts every rank's simulation on GPU 1: under "
                                        "launcher=torchrun give env.sim_backend=physx_cuda"):
        make_env(EnvConfig(sim_backend="physx_cuda:1", num_envs=16))


def test_sb3_view_trains_ppo_and_reports_episodes():
    with make_env(EnvConfig(task="PushCube-v1", num_envs=2, max_episode_steps=8)) as env:
        view = SB3View(env)
        assert isinstance(view.observation_space, gym.spaces.Box) and view.observation_space.shape == (35,)
        obs = view.reset()
        assert obs.shape == (2, 35) and obs.dtype == np.float32
        infos = []
        for _ in range(8):
            obs, reward, done, step_infos = view.step(np.zeros((2, 4), dtype=np.float32))
            infos += [i for i in step_infos if "terminal_observation" in i]
        assert len(infos) == 2 and infos[0]["TimeLimit.truncated"] and infos[0]["episode"]["l"] == 8
        assert "is_success" in infos[0] and infos[0]["terminal_observation"].shape == (35,)
        model = PPO("MlpPolicy", view, n_steps=8, batch_size=16, n_epochs=1, seed=0, device="cpu")
        before = [p.detach().clone() for p in model.policy.parameters()]
        model.learn(total_timesteps=16)
        assert any(not torch.equal(a, b) for a, b in zip(before, model.policy.parameters()))
        action, _ = model.predict(obs, deterministic=True)
        assert action.shape == (2, 4)
