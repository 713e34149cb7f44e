"""RPD: the teacher-guided PPO student (robodistill rpd) and the teacher interface."""

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from stable_baselines3 import PPO
from stable_baselines3.common.utils import explained_variance

from robodistill.envs import EnvConfig, SB3View, make_env
from robodistill.policies import load_policy
from robodistill.policies.teachers import PolicyTeacher
from robodistill.evaluation import HELD_OUT_SEEDS, evaluate
from robodistill.policies.student import NormalizedState, StateAndImage
from robodistill.training.distributed import Ranks
from robodistill.training.rpd import RPD, RPDConfig, fit_normalizer, resumed_seed, stack_history, teacher_rollout, warm_start

ENV = EnvConfig(task="PushCube-v1")
SMALL = {"n_steps": 100, "batch_size": 25, "n_epochs": 10, "learning_rate": 1e-3, "device": "cpu",
         "policy_kwargs": {"net_arch": [64, 64], "features_extractor_class": NormalizedState}}


def test_history_repeats_the_first_observation_of_each_episode():
    obs = np.arange(6, dtype=np.float32).reshape(6, 1, 1)  # one env, observations 0..5
    starts = np.array([1, 0, 0, 1, 0, 0], dtype=np.float32).reshape(6, 1)  # episodes begin at 0 and 3
    h = stack_history(obs, starts, 3, None, None)[:, 0, :, 0]
    assert h.tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 2], [3, 3, 3], [3, 3, 4], [3, 4, 5]]
    # The next rollout continues the episode from the previous rollout's last two steps.
    nxt = stack_history(np.array([[[6.0]]]), np.zeros((1, 1)), 3, obs[-2:], starts[-2:])[:, 0, :, 0]
    assert nxt.tolist() == [[4, 5, 6]]


class ChunkTeacher:
    """Answers every query with a 3-action chunk [asked-at state value, index in chunk, 0, 0]."""

    obs_horizon, act_horizon = 1, 3

    def act(self, obs):
        asked = obs["state"][:, -1, 0]
        return torch.stack([torch.stack([asked, torch.full_like(asked, k), 0 * asked, 0 * asked], -1) for k in range(3)], 1)


def test_chunk_labels_follow_the_teacher_s_own_chunks_across_rollouts():
    with make_env(ENV) as env:
        vec = SB3View(env)
        labelled = {}
        for labels in ("chunk", "step"):
            model = RPD("MlpPolicy", vec, teacher=ChunkTeacher(), labels=labels, seed=0, **{**SMALL, "n_steps": 7, "batch_size": 7})
            buf, rows = model.rollout_buffer, []
            # Two rollouts of one env: episodes start at steps 0 and 5, the second one runs on into rollout 2.
            for first, starts in ((100, [1, 0, 0, 0, 0, 1, 0]), (200, [0] * 7)):
                buf.observations[:, 0, 0] = np.arange(first, first + 7)
                buf.episode_starts[:, 0] = starts
                model._label(buf)
                rows += buf.teacher_actions[:, 0, :2].tolist()
            labelled[labels] = rows
    # Asked where the teacher asks itself (every 3 steps of an episode); a chunk open at a rollout's end carries on.
    assert labelled["chunk"] == [[100, 0], [100, 1], [100, 2], [103, 0], [103, 1], [105, 0], [105, 1],
                                 [105, 2], [201, 0], [201, 1], [201, 2], [204, 0], [204, 1], [204, 2]]
    assert labelled["step"] == [[v, 0] for v in [*range(100, 107), *range(200, 207)]]
    # Rollouts shorter than a chunk: the third falls wholly inside the chunk asked for in the second.
    with make_env(ENV) as env:
        model = RPD("MlpPolicy", SB3View(env), teacher=ChunkTeacher(), seed=0, **{**SMALL, "n_steps": 2, "batch_size": 2})
        buf, rows = model.rollout_buffer, []
        for first, starts in ((100, [1, 0]), (200, [0, 0]), (300, [0, 0])):
            buf.observations[:, 0, 0] = np.arange(first, first + 2)
            buf.episode_starts[:, 0] = starts
            model._label(buf)
            rows += buf.teacher_actions[:, 0, :2].tolist()
    assert rows == [[100, 0], [100, 1], [100, 2], [201, 0], [201, 1], [201, 2]]


class CountingTeacher(PolicyTeacher):
    def __init__(self, policy):
        super().__init__(policy)
        self.calls = 0

    def act(self, obs):
        self.calls += 1
        return super().act(obs)


def _gap(model, states: torch.Tensor, teacher: PolicyTeacher) -> float:
    """Mean squared distance between the student's mean action and the teacher's on fixed states."""
    with torch.no_grad():
        mean = model.policy.get_distribution(states).distribution.mean
        return float(((mean - PolicyTeacher.act(teacher, {"state": states[:, None]})[:, 0]) ** 2).mean())


def _trained(cls, **kwargs):
    """A fresh env and a model of `cls` after 1200 env steps from seed 0. (At 400 steps the pull on the held-out
    reset states was 0.35-0.68 of PPO's gap over seeds 0-2, too close to the bar to tell from platform noise; at 1200
    it is 0.05-0.20.)"""
    with make_env(ENV) as env:
        vec = SB3View(env)
        model = cls("MlpPolicy", vec, seed=0, **SMALL, **kwargs)
        fit_normalizer(model, vec, 300, seed=0)
        model.learn(1200)
    return model


def test_rpd_pulls_the_student_to_the_teacher_and_off_is_plain_ppo():
    with make_env(ENV) as env:
        teacher = CountingTeacher(load_policy("scripted", env))
        states = torch.stack([env.reset(seed=s)["state"][0] for s in range(32)])
    rpd = _trained(RPD, teacher=teacher, distill_coef=10.0)
    assert teacher.calls == 12  # once per rollout (100 steps, one batch), not per minibatch or epoch
    ppo = _trained(PPO)
    off = _trained(RPD, teacher=teacher, distill_coef=0.0)
    assert teacher.calls == 12  # lambda = 0: the teacher is never asked
    for a, b in zip(ppo.policy.parameters(), off.policy.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the identical PPO baseline
    untrained = RPD("MlpPolicy", SB3View(make_env(ENV)), seed=0, **SMALL)
    untrained.policy.features_extractor.load_state_dict(rpd.policy.features_extractor.state_dict())
    before, pulled, ppo_gap = (_gap(m, states, teacher) for m in (untrained, rpd, ppo))
    assert pulled < 0.3 * before and pulled < 0.3 * ppo_gap, (before, pulled, ppo_gap)


def test_warm_start_fits_the_student_to_the_acting_teacher_and_v_to_its_returns():
    with make_env(ENV) as env:
        teacher = PolicyTeacher(load_policy("scripted", env))
        vec = SB3View(env)
        model = RPD("MlpPolicy", vec, teacher=teacher, seed=0, **SMALL)
        fit_normalizer(model, vec, 300, seed=0)
        held_out = teacher_rollout(env, vec, teacher, 300, gamma=0.8, seed=100)
        states = torch.as_tensor(held_out.observations)
        before = _gap(model, states, teacher)
        cfg = RPDConfig(warm_start_steps=600, warm_start_epochs=30, batch_size=25, lr=1e-3, progress=False)
        report = warm_start(model, env, vec, teacher, cfg, gamma=0.8, seed=0, ranks=Ranks())
        after = _gap(model, states, teacher)
    # The scripted expert ends episodes by solving them; the steps are counted as training steps.
    assert report["env_steps"] == 600 and model.num_timesteps == 600 and report["teacher_successes"] >= 3, report
    assert after < 0.2 * before, (before, after)
    with torch.no_grad():
        values = model.policy.predict_values(states).flatten()
    complete = held_out.complete
    ev = explained_variance(values[complete].numpy(), held_out.returns[complete].numpy())
    assert ev > 0.5, ev  # V predicts the discounted returns of episodes it did not see


def test_rpd_cli_trains_resumes_and_saves_an_sb3_student(cli, cli_here, tmp_path):
    args = ["teacher=scripted", "n_steps=100", "batch_size=50", "n_epochs=2", "hidden=[32,32]", "eval_every=200",
            "eval_episodes=2", "checkpoint_every=200", "env.max_episode_steps=25", "name=r", "warm_start_steps=100",
            "normalize_advantage=false"]
    first = cli("rpd", *args, "total_steps=200")
    assert first.returncode == 0 and "warm start: the teacher ran 100 env steps" in first.stdout, first.stderr[-3000:]
    # Killed after an evaluation at 300 and before the checkpoint there: the resumed run drops that row and goes on.
    run = sorted((tmp_path / "runs" / "rpd").glob("*-r"))[-1]
    history = json.loads((run / "history.json").read_text())
    (run / "history.json").write_text(json.dumps([*history, {**history[-1], "step": 300}]))
    # Resumed without the episode limit or the teacher: the run goes on in the env it trained in, not the task's
    # default, and with its teacher, not as plain PPO.
    more = cli("rpd", *[a for a in args if a not in ("env.max_episode_steps=25", "teacher=scripted")], "total_steps=400", "resume=true")
    assert more.returncode == 0 and "at step 200" in more.stdout, more.stderr[-3000:]
    assert "as the resumed run was trained: env.max_episode_steps=25" in more.stdout
    assert "as the resumed run was trained: teacher=scripted (set <field>= to change)" in more.stdout
    first_run, run = sorted((tmp_path / "runs" / "rpd").glob("*-r"))  # the resumed run logs in a directory of its own
    # ...whose config records the teacher it went on with, so resuming it again keeps the teacher too
    assert "teacher: scripted" in (run / ".hydra" / "config.yaml").read_text().splitlines()
    assert OmegaConf.load(run / ".hydra" / "config.yaml").env.max_episode_steps == 25  # and the env it took, as it ran
    assert len(list((first_run / "tb").rglob("events.*"))) == 1 and list((run / "tb").rglob("events.*"))
    # TensorBoard draws each evaluation at its step, as history.json has it, the final one too: SB3's logger drew each
    # one rollout late (at its next dump), and the one after learning ended never.
    def logged(run: Path) -> list[int]:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        (tb,) = (run / "tb").iterdir()
        events = EventAccumulator(str(tb))
        events.Reload()
        return [e.step for e in events.Scalars("eval/success_once")]

    assert logged(first_run) == [100, 200] and logged(run) == [400]
    history = json.loads((run / "history.json").read_text())
    assert [h["step"] for h in history] == [100, 200, 400] and all(0 <= h["success_once"] <= 1 for h in history)
    assert (run / "curves.png").stat().st_size > 10_000  # success and return at 100, 200 and 400 env steps
    table = cli_here("summary", "--name", "r")
    assert table.returncode == 0 and any(line.startswith("rpd") and run.name in line and "400 env steps, success_once" in line
                                         for line in table.stdout.splitlines()), table.stdout
    student = PPO.load(run / "student.zip", device="cpu")
    action, _ = student.predict(np.zeros(student.observation_space.shape, np.float32), deterministic=True)
    assert action.shape == (4,) and student.num_timesteps == 400 and student.normalize_advantage is False
    assert student.robodistill_env["max_episode_steps"] == 25
    ev = cli("eval", f"policy={run / 'student.zip'}", "episodes=2", "env.max_episode_steps=10", "name=zip")
    assert ev.returncode == 0 and "success_once" in ev.stdout, ev.stderr[-2000:]
    # The student exports like a teacher: the bundle's actions are the zip's mean actions.
    ex = cli("export", f"ckpt={run / 'student.zip'}")
    assert ex.returncode == 0 and "mean action; 1 action per inference" in ex.stdout, ex.stderr[-2000:]
    assert re.search(r"\(onnx, [1-9]\d* kB\)", ex.stdout), ex.stdout  # a small MLP's size, not "0.0 MB"
    (bundle,) = (tmp_path / "runs" / "export").iterdir()
    assert bundle.name.endswith("-onnx") and "consistency" not in bundle.name  # no sampler: the run is named by its format
    ev2 = cli("eval", f"policy={bundle / 'bundle'}", "episodes=2", "env.max_episode_steps=10", "name=bundle")
    assert ev2.returncode == 0, ev2.stderr[-2000:]
    returns = [[e["return"] for e in json.loads(next((tmp_path / "runs" / "eval").glob(f"*-{n}")).joinpath("eval.json").read_text())["episodes"]]
               for n in ("zip", "bundle")]
    np.testing.assert_allclose(returns[0], returns[1], atol=1e-3)
    # PullCube-v1 gives the same 35-d state and 4-d action as PushCube-v1: only the task the zip records tells them apart.
    other = cli_here("eval", f"policy={run / 'student.zip'}", "env=PullCube-v1", "episodes=1")
    assert other.returncode == 2 and "was trained on {'task': 'PushCube-v1'" in other.stderr, other.stderr[-2000:]
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes((run / "student.zip").read_bytes()[:5000])
    ex = cli_here("export", f"ckpt={truncated}")
    assert ex.returncode == 2 and "truncated.zip' is not a stable-baselines3 PPO zip" in ex.stderr, ex.stderr[-2000:]
    assert list((tmp_path / "runs" / "export").iterdir()) == [bundle]  # and no run directory left behind
    for bad, message in {"distill=kl": "distill='kl' is not one of mse, l1, bc",
                         "eval_episodes=0": "eval_episodes=0 must be >= 1 (the run rates its final policy on them)",
                         "teacher=ws://127.0.0.1:9": "no policy server at ws://127.0.0.1:9",
                         "teacher=missing.pt": "teacher=missing.pt: policy 'missing.pt' is neither",
                         "warm_start_steps=5": "warm_start_steps=5 needs a teacher",
                         "timeout_ms=0": "timeout_ms=0.0 must be > 0",
                         "n_steps=300": "total_steps=200 is less than one rollout (n_steps * env.num_envs * ranks = 300"}.items():
        r = cli_here("rpd", bad, "total_steps=200")
        assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]
    done = cli_here("rpd", f"resume_from={run}", "total_steps=400")  # nothing left to train: not a run without its history
    assert done.returncode == 2 and "at env step 400: the run already trained total_steps=400" in done.stderr, done.stderr[-2000:]


def test_evaluations_and_checkpoints_come_after_the_update_of_the_rollout_before(tmp_path):
    """SB3 steps the callback while it collects a rollout: at a rollout's last step the run rated and saved the policy
    without that rollout's update, so the final row was not the saved student's and the eval at 100 was step 0's."""
    from robodistill.evaluation import HELD_OUT_SEEDS
    from robodistill.policies.student import GaussianStudent
    from robodistill.training import rpd

    cfg = RPDConfig(env=EnvConfig(max_episode_steps=25), total_steps=200, n_steps=100, batch_size=50, n_epochs=1,
                    hidden=[32, 32], obs_norm_steps=20, eval_every=100, eval_episodes=2, checkpoint_every=100, progress=False)
    history = rpd.train(cfg, tmp_path)["history"]
    assert [row["step"] for row in history] == [0, 100, 200] and history[0]["return"] != history[1]["return"]
    with make_env(cfg.env, ignore_terminations=True) as env:
        saved = evaluate(GaussianStudent(PPO.load(tmp_path / "student.zip", device="cpu")), env, 2, seed=HELD_OUT_SEEDS, progress=False)
    assert saved.summary["mean_return"] == pytest.approx(history[-1]["return"])


def test_a_resumed_run_keeps_its_ppo_settings_and_network_unless_given(tmp_path):
    """SB3's zip holds the run's PPO settings: given ones were silently ignored on resume (and recorded as used), those
    left out were not recorded; another network cannot take the zip's weights. Evaluations went to the defaults'."""
    from robodistill.errors import UserError
    from robodistill.training import rpd

    cfg = RPDConfig(env=EnvConfig(max_episode_steps=25), total_steps=100, n_steps=100, batch_size=50, n_epochs=1,
                    hidden=[32, 32], obs_norm_steps=20, eval_every=0, eval_episodes=1, checkpoint_every=100, progress=False)
    rpd.train(cfg, tmp_path / "first")
    (tmp_path / "first" / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.structured(cfg), tmp_path / "first" / ".hydra" / "config.yaml")  # as hydra keeps a run's config
    resumed = RPDConfig(env=cfg.env, total_steps=150, n_steps=50, lr=0.1, progress=False, resume_from=str(tmp_path / "first"))
    rpd.take_resumed_settings(resumed, tmp_path / "first" / "checkpoints" / "last.zip", {"env", "total_steps", "n_steps", "lr"})
    assert (resumed.batch_size, resumed.n_epochs, resumed.hidden) == (50, 1, [32, 32])  # the run's own
    assert (resumed.eval_every, resumed.eval_episodes) == (0, 1)  # its history goes on with evaluations of the same size
    rpd.train(resumed, tmp_path / "resumed")
    student = PPO.load(tmp_path / "resumed" / "student.zip", device="cpu")
    assert (student.learning_rate, student.n_steps, student.batch_size, student.num_timesteps) == (0.1, 50, 50, 150)
    with pytest.raises(UserError, match=r"hidden=\[8\]: the resumed run's student was built with hidden=\[32, 32\]"):
        rpd.take_resumed_settings(replace(resumed, hidden=[8]), tmp_path / "first" / "student.zip", {"hidden"})


def test_a_resumed_run_starts_its_episodes_apart_from_the_ones_it_is_rated_on():
    """A run resumed at 10,000 env steps (the default first checkpoint) reseeded SB3 with seed + steps, and its envs' first
    episodes were the held-out evaluation's (HELD_OUT_SEEDS + seed + k): trained on, then rated on."""
    cfg = RPDConfig()
    with make_env(replace(ENV, num_envs=1)) as env:
        rated = torch.cat([env.reset(seed=[HELD_OUT_SEEDS + cfg.seed + k])["state"] for k in range(3)])
        vec = SB3View(env)
        model = PPO("MlpPolicy", vec, n_steps=16, batch_size=16, device="cpu")
        for steps in range(cfg.checkpoint_every, cfg.checkpoint_every + 3):
            model.set_random_seed(resumed_seed(cfg.seed, steps))  # as a resumed run does: SB3 seeds the envs' next reset
            trained = torch.as_tensor(vec.reset())
            assert not torch.isclose(trained, rated).all(-1).any(), f"resumed at step {steps}: its first episode is rated on"


def test_rpd_killed_in_its_final_evaluation_resumes_and_finishes(tmp_path, monkeypatch):
    from robodistill.training import rpd

    cfg = RPDConfig(env=EnvConfig(max_episode_steps=25), teacher="none", total_steps=200, n_steps=100, batch_size=50,
                    n_epochs=1, hidden=[32, 32], obs_norm_steps=50, eval_every=0, eval_episodes=1, checkpoint_every=100,
                    progress=False)
    calls = []

    def killed_at_the_end(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the first rates the untrained student
            raise KeyboardInterrupt  # stands for the SIGKILL: nothing after the final evaluation runs
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(rpd, "evaluate", killed_at_the_end)
    with pytest.raises(KeyboardInterrupt):
        rpd.train(cfg, tmp_path / "killed")
    assert rpd.trained_steps(tmp_path / "killed" / "checkpoints" / "last.zip") == 100
    monkeypatch.undo()
    resumed = rpd.train(replace(cfg, resume_from=str(tmp_path / "killed")), tmp_path / "resumed")
    assert [row["step"] for row in resumed["history"]] == [0, 200]
    assert rpd.trained_steps(tmp_path / "resumed" / "student.zip") == rpd.trained_steps(tmp_path / "resumed" / "checkpoints" / "last.zip") == 200


class RecordingTeacher(PolicyTeacher):
    """Remembers what it was asked with."""

    def act(self, obs):
        self.seen = {k: (tuple(v.shape[1:]), v.dtype) for k, v in obs.items()}
        return super().act(obs)


def test_rgb_student_cnn_is_pulled_toward_a_teacher_that_sees_images(pickcube_rgb_demos, tmp_path):
    from robodistill.training.teacher import TrainTeacherConfig, train

    env_cfg = EnvConfig(task="PickCube-v1", obs_mode="rgb", image_size=48)
    train(TrainTeacherConfig(env=env_cfg, dataset=str(pickcube_rgb_demos["path"]), iterations=4, batch_size=8, eval_every=0,
                             eval_episodes=0, val_fraction=0, threads=1), tmp_path / "teacher")
    kwargs = {"seed": 0, "n_steps": 40, "batch_size": 20, "n_epochs": 4, "learning_rate": 1e-3, "device": "cpu",
              "policy_kwargs": {"net_arch": [32], "features_extractor_class": StateAndImage}}
    with make_env(env_cfg) as env:
        teacher = RecordingTeacher(load_policy(str(tmp_path / "teacher" / "checkpoints" / "last.pt"), env))
        vec = SB3View(env)
        # labels=step: one label per observation, which a memoryless student can fit (chunk labels are checked above).
        model = RPD("MultiInputPolicy", vec, teacher=teacher, distill_coef=10.0, labels="step", **kwargs)
        fit_normalizer(model, vec, 20, seed=0)
        untrained = RPD("MultiInputPolicy", vec, teacher=teacher, **kwargs)
        untrained.policy.load_state_dict(model.policy.state_dict())
        model.learn(80)
    # The teacher got its own input: image histories as (H, W, C) uint8, states as float.
    assert teacher.seen == {"rgb": ((2, 48, 48, 3), torch.uint8), "state": ((2, vec.observation_space["state"].shape[0]), torch.float32)}
    buf = model.rollout_buffer  # the last rollout, labelled by the teacher
    obs = {k: torch.as_tensor(v) for k, v in buf.observations.items()}
    labels = torch.as_tensor(buf.teacher_actions)
    with torch.no_grad():
        gap = [float(((m.policy.get_distribution(obs).distribution.mean - labels) ** 2).mean()) for m in (untrained, model)]
    assert gap[1] < 0.5 * gap[0], gap
    model.save(tmp_path / "student.zip")
    with make_env(env_cfg, ignore_terminations=True) as env:
        student = load_policy(tmp_path / "student.zip", env)  # a Path, as the Python API takes
        assert evaluate(student, env, 1, progress=False).summary["episodes"] == 1


def test_a_camera_teacher_sees_exactly_what_a_live_camera_env_sees_of_the_same_states():
    rng = np.random.default_rng(0)
    cfg = EnvConfig(task="PushCube-v1", obs_mode="rgb", image_size=48)
    with make_env(cfg) as live, make_env(cfg) as view:
        seen, states = [live.reset(seed=3)], [live.sim_states()]
        for _ in range(20):
            seen.append(live.step(torch.as_tensor(rng.uniform(-1, 1, (1, 4)), dtype=torch.float32))[0])
            states.append(live.sim_states())
        rendered = view.observe_states(np.concatenate(states))
    for key in ("state", "rgb"):
        torch.testing.assert_close(rendered[key], torch.cat([s[key] for s in seen]), rtol=0, atol=1e-5)


class QposTeacher:
    """Sees the camera and proprioception; its chunk repeats [qpos_0, qpos_1 of the newest frame, of the frame
    before, the image's mean brightness], so a label says which states the teacher was shown."""

    obs_horizon, act_horizon = 2, 4

    def act(self, obs):
        assert obs["rgb"].dtype == torch.uint8 and obs["rgb"].shape[1:] == (2, 48, 48, 3), obs["rgb"].shape
        state = obs["state"]
        row = torch.stack([state[:, -1, 0], state[:, -1, 1], state[:, -2, 0], obs["rgb"][:, -1].float().mean((1, 2, 3)) / 255], -1)
        return row[:, None].repeat(1, self.act_horizon, 1)


def test_a_state_student_s_camera_teacher_is_shown_its_stored_states_rendered_only_where_it_asks():
    with make_env(EnvConfig(task="PickCube-v1", max_episode_steps=50)) as env, \
            make_env(EnvConfig(task="PickCube-v1", obs_mode="rgb", image_size=48)) as view:
        rendered = []
        observe = view.observe_states
        view.observe_states = lambda states: rendered.append(len(states)) or observe(states)
        vec = SB3View(env)
        vec.log_sim_states(13)
        model = RPD("MlpPolicy", vec, teacher=QposTeacher(), teacher_view=view, seed=0, **{**SMALL, "n_steps": 12, "batch_size": 12})
        fit_normalizer(model, vec, 10, seed=0)
        labels, observations = [], []
        for _ in range(2):  # two rollouts of one episode: the second one's history starts in the first
            model.learn(12, reset_num_timesteps=False)
            buf = model.rollout_buffer  # flattened by the update: one env, so in time order
            labels.append(buf.teacher_actions.reshape(12, -1).copy())
            observations.append(buf.observations.reshape(12, -1).copy())
    labels, qpos = np.concatenate(labels), np.concatenate(observations)[:, :2]
    asked = np.arange(24) // 4 * 4  # every act_horizon steps from the episode's start, the chunk's actions between
    np.testing.assert_allclose(labels[:, :2], qpos[asked], atol=1e-5)  # the states behind the stored observations
    np.testing.assert_allclose(labels[:, 2], qpos[np.maximum(asked - 1, 0), 0], atol=1e-5)  # and the frame before
    assert (labels[:, 3] > 0.1).all()  # a real image
    assert sum(rendered) == 6 * 2 - 1, rendered  # 6 questions x 2 frames, the episode's first state once


def test_rpd_trains_a_state_student_of_an_rgb_teacher_it_shows_rendered_states(pickcube_rgb_demos, tmp_path):
    from robodistill.errors import UserError
    from robodistill.training.rpd import check, train
    from robodistill.training.teacher import TrainTeacherConfig, train as train_teacher

    env_cfg = EnvConfig(task="PickCube-v1", image_size=48, max_episode_steps=20)
    train_teacher(TrainTeacherConfig(env=EnvConfig(task="PickCube-v1", obs_mode="rgb", image_size=48), dataset=str(pickcube_rgb_demos["path"]),
                                     iterations=4, batch_size=8, eval_every=0, eval_episodes=0, val_fraction=0, threads=1), tmp_path / "teacher")
    teacher = str(tmp_path / "teacher" / "checkpoints" / "last.pt")
    cfg = RPDConfig(env=env_cfg, teacher=teacher, teacher_obs_mode="rgb", total_steps=60, n_steps=20, batch_size=20, n_epochs=1,
                    warm_start_steps=20, hidden=[16], eval_every=0, eval_episodes=1, progress=False)
    result = train(cfg, tmp_path / "student")
    student = PPO.load(result["student"], device="cpu")
    with make_env(env_cfg) as env:
        assert student.observation_space.shape == env.single_observation_space["state"].shape  # the full state, no image
    assert result["history"][-1]["step"] == 60
    for bad, message in (({"teacher_obs_mode": "depth"}, "teacher_obs_mode='depth' is not one of state, rgb"),
                         ({"teacher": "none", "warm_start_steps": 0}, "teacher=none is not one"),
                         ({"teacher": "ws://127.0.0.1:9"}, "a served teacher is sent the student's observations")):
        with pytest.raises(UserError, match=message):
            check(replace(cfg, **bad))


def test_rpd_resumed_from_another_directory_finds_its_teacher(cli, tmp_path, pushcube_demos):
    # the run recorded teacher= as given, relative to where it started: resume=true took it and, run elsewhere, could not find it
    from tests.conftest import run_cli
    from tests.test_teacher import TINY, run_dir

    t = cli("train-teacher", f"dataset={pushcube_demos}", *TINY, "iterations=2", "eval_every=0", "eval_episodes=0", "name=t")
    assert t.returncode == 0, t.stderr[-3000:]
    teacher = run_dir(tmp_path, "t") / "checkpoints" / "last.pt"
    args = ["n_steps=50", "batch_size=50", "n_epochs=1", "hidden=[16]", "eval_every=0", "eval_episodes=1", "threads=1"]
    first = cli("rpd", f"teacher={teacher.relative_to(tmp_path)}", *args, "total_steps=50", "name=r")
    assert first.returncode == 0, first.stderr[-3000:]
    (tmp_path / "elsewhere").mkdir()
    more = run_cli("rpd", f"resume_from={run_dir(tmp_path, 'r', 'rpd')}", *args, "total_steps=100", cwd=tmp_path / "elsewhere")
    assert more.returncode == 0 and f"teacher={teacher}" in more.stdout, more.stderr[-3000:]


def test_rpd_rated_on_the_initial_states_its_teacher_learnt_from_is_refused_before_it_trains(cli_here, tmp_path, pushcube_demos):
    # the student learns the teacher's actions: rated on the teacher's demonstrations' initial states, it is rated where
    # its teacher is strongest (distill refuses the same for its head); rpd read no dataset and trained on
    from tests.conftest import relabeled_demos
    from tests.test_teacher import TINY, run_dir

    rated = relabeled_demos(pushcube_demos, tmp_path / "rated", HELD_OUT_SEEDS)  # `demos seed=10000`: seeds 10000-10002
    t = cli_here("train-teacher", f"dataset={rated}", *TINY, "iterations=1", "eval_episodes=0", "val_fraction=0", "name=t")
    assert t.returncode == 0, t.stderr[-3000:]
    teacher = run_dir(tmp_path, "t") / "checkpoints" / "last.pt"
    args = [f"teacher={teacher}", "total_steps=50", "n_steps=50", "batch_size=50", "n_epochs=1", "hidden=[16]", "eval_every=0",
            "eval_episodes=2", "threads=1"]
    r = cli_here("rpd", *args, "name=r")
    assert r.returncode == 2 and (f"dataset {rated}: 2 of its episodes start from seeds that this run rates its student on (10000 to "
                                  f"10001): 10000, 10001; it would rate the initial states the policy learnt from: teacher={teacher} was "
                                  "trained on them and the student learns its actions: set seed=3 or more") in r.stderr, r.stderr[-2000:]
    assert not list(tmp_path.glob("runs/rpd/*/history.json"))  # refused before it trained
    # a student that does not learn from the teacher (plain PPO) is not refused, nor one whose teacher's data is gone
    assert cli_here("rpd", *args, "distill_coef=0", "name=ppo").returncode == 0
    rated.unlink()
    gone = cli_here("rpd", *args, "name=gone")
    assert gone.returncode == 0, gone.stderr[-2000:]


def test_a_state_student_of_an_rgb_teacher_is_told_to_show_it_images(cli_here, pickcube_rgb_teacher):
    # The loader said "set env.obs_mode=rgb" alone: an RGB student, whose NatureCNN needs 36 px or more where the
    # teacher's camera (taken for the student) may be smaller, and a teacher refuses another camera size.
    r = cli_here("rpd", "env=PickCube-v1", f"teacher={pickcube_rgb_teacher}", "total_steps=40", "n_steps=20", "batch_size=20")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "sees rgb observations, the student state ones: add teacher_obs_mode=rgb" in r.stderr, r.stderr[-2000:]


def test_rpd_that_diverges_ends_in_one_line(cli_here):
    # the NaN weights' next rollout ended in torch's "Expected parameter scale ... found invalid values" traceback
    r = cli_here("rpd", "env=PushCube-v1", "lr=100", "total_steps=400", "n_steps=100", "batch_size=50", "eval_every=0")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert re.search(r"^error: the policy's weights stopped being finite by env step \d+: training diverged at lr=100: lower lr= "
                     r"and start again", r.stderr, re.M), r.stderr[-2000:]


def test_rpd_at_an_absurd_lr_ends_in_one_line_though_its_weights_stay_finite():
    # lr=1e30 left every weight finite and the log std at about -1e30 or 1e30, a std of 0 or inf: torch's "Expected
    # parameter scale ... found invalid values" traceback in the next rollout (lr=100's NaN weights were caught)
    from robodistill.errors import UserError

    with make_env(ENV) as env:
        model = RPD("MlpPolicy", SB3View(env), seed=0, **{**SMALL, "learning_rate": 1e30, "n_epochs": 1})
        with pytest.raises(UserError, match=r"^the policy's weights stopped being finite by env step 100: training diverged at lr=1e\+30: "):
            model.learn(300)


def test_a_teacher_whose_actions_are_not_finite_is_one_clear_line():
    # a teacher with NaN weights taught the student NaN, and the run ended saying the student's lr= diverged
    from robodistill.errors import UserError
    from robodistill.policies.diffusion import DiffusionConfig, DiffusionPolicy

    with make_env(ENV) as env:
        teacher = DiffusionPolicy(DiffusionConfig(mlp_hidden=[16]), env.single_observation_space["state"].shape[0], 4,
                                  env.action_low.cpu(), env.action_high.cpu()).eval()
        with torch.no_grad():
            for p in teacher.denoiser.parameters():
                p.fill_(float("nan"))
        model = RPD("MlpPolicy", SB3View(env), teacher=PolicyTeacher(teacher), seed=0, **{**SMALL, "n_epochs": 1})
        with pytest.raises(UserError, match=r"^the teacher's actions are not finite \(NaN or inf\)"):
            model.learn(100)


def test_ppo_settings_that_cannot_train_are_one_clear_line(cli_here):
    # lr=-1 was torch's traceback; the others trained on quietly (n_epochs=-1: no update at all)
    for arg, message in (("lr=-1", "lr=-1.0 must be > 0"), ("gamma=-1", "gamma=-1.0 must be in [0, 1] (a discount)"),
                         ("gae_lambda=2", "gae_lambda=2.0 must be in [0, 1] (GAE lambda)"), ("clip_range=0", "clip_range=0.0 must be > 0"),
                         ("n_epochs=-1", "n_epochs=-1 must be >= 1")):
        r = cli_here("rpd", "teacher=none", arg)
        assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, (arg, r.stderr[-2000:])


def test_distill_losses_compare_the_student_s_mean_or_likelihood_with_the_teacher_s_action():
    with make_env(ENV) as env:
        model = RPD("MlpPolicy", SB3View(env), seed=0, **SMALL)
    obs = torch.randn(6, *model.observation_space.shape)
    teacher = torch.rand(6, *model.action_space.shape) * 2 - 1
    dist = model.policy.get_distribution(obs)
    mean, std = dist.distribution.mean, dist.distribution.stddev
    expected = {"mse": ((mean - teacher) ** 2).mean(), "l1": (mean - teacher).abs().mean(),
                # minus the student's log-likelihood of the teacher's action, summed over action dims as SB3's log_prob
                "bc": -torch.distributions.Normal(mean, std).log_prob(teacher).sum(-1).mean()}
    for distill, value in expected.items():
        model.distill = distill
        torch.testing.assert_close(model._distill_loss(dist, teacher), value)


def test_cosine_lambda_anneals_from_distill_coef_to_zero_and_stays_off():
    with make_env(ENV) as env:
        model = RPD("MlpPolicy", SB3View(env), teacher=ChunkTeacher(), distill_coef=2.0, schedule="cosine", anneal_steps=1000,
                    seed=0, **SMALL)
    coef = {}
    for steps in (0, 250, 500, 1000, 1500):
        model.num_timesteps = steps
        coef[steps] = model.coef()
    assert coef == pytest.approx({0: 2.0, 250: 1.0 + 2 ** -0.5, 500: 1.0, 1000: 0.0, 1500: 0.0})
    model.schedule = "constant"
    assert model.coef() == 2.0  # at 1500 steps too


def test_teacher_rollout_returns_are_discounted_within_each_episode(monkeypatch):
    with make_env(ENV) as env:
        vec = SB3View(env)
        seen, step = [], env.step

        def recorded(action):
            out = step(action)
            seen.append((out[1].float().cpu(), (out[2] | out[3]).cpu()))
            return out

        monkeypatch.setattr(env, "step", recorded)
        data = teacher_rollout(env, vec, PolicyTeacher(load_policy("scripted", env)), 120, gamma=0.8, seed=0)
    rewards, dones = (torch.stack(x)[:, 0].tolist() for x in zip(*seen))
    ends = [t for t, d in enumerate(dones) if d]
    assert len(ends) >= 2 and ends[0] < len(dones) - 1  # an episode ends, and another begins inside the rollout
    ret, expected, complete = 0.0, [], []
    for t in reversed(range(len(rewards))):
        ret = rewards[t] + (0.0 if dones[t] else 0.8 * ret)
        expected.insert(0, ret)
        complete.insert(0, t <= ends[-1])
    torch.testing.assert_close(data.returns, torch.tensor(expected))
    assert data.complete.tolist() == complete and data.episodes == len(ends)


def test_warm_start_leaves_v_alone_on_steps_whose_episode_the_rollout_cut_off():
    with make_env(ENV) as env:
        teacher = PolicyTeacher(load_policy("scripted", env))
        vec = SB3View(env)
        model = RPD("MlpPolicy", vec, teacher=teacher, seed=0, **SMALL)
        v = [*model.policy.mlp_extractor.value_net.parameters(), *model.policy.value_net.parameters()]
        value_net = [p.clone() for p in v]
        cfg = RPDConfig(warm_start_steps=10, warm_start_epochs=2, batch_size=5, lr=1e-3, progress=False)
        report = warm_start(model, env, vec, teacher, cfg, gamma=0.8, seed=0, ranks=Ranks())
    # 10 steps end no episode of the scripted expert: no return is whole, so V has nothing to learn from
    assert report["episodes"] == 0 and report["value_mse"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(value_net, v))
    assert report["action_mse"] > 0


def test_lambda_weights_the_distillation_term_s_gradient():
    """One plain-SGD step from the same weights on the same rollout: the step of lambda minus PPO's own (lambda = 0) is
    lambda times the distillation loss's gradient, so it is 4x as long at lambda 2 as at 0.5."""
    moved = {}
    for coef in (0.0, 0.5, 2.0):
        with make_env(ENV) as env:
            vec = SB3View(env)
            model = RPD("MlpPolicy", vec, teacher=PolicyTeacher(load_policy("scripted", env)), distill_coef=coef, seed=0,
                        **{**SMALL, "learning_rate": 1e-2, "n_epochs": 1, "batch_size": 100, "max_grad_norm": 1e9, "target_kl": None})
            fit_normalizer(model, vec, 100, seed=0)
            model.policy.optimizer = torch.optim.SGD(model.policy.parameters(), lr=1e-2)  # Adam would normalise the scale away
            start = torch.nn.utils.parameters_to_vector(model.policy.parameters()).detach().clone()
            model.learn(100)  # one rollout, one minibatch: one step
            moved[coef] = torch.nn.utils.parameters_to_vector(model.policy.parameters()).detach() - start
    pull = moved[0.5] - moved[0.0]
    scale = pull.abs().max().item()
    assert scale > 1e-4, scale  # 2.5e-3 here
    torch.testing.assert_close(moved[2.0] - moved[0.0], 4 * pull, rtol=0, atol=1e-3 * scale)  # float32 rounding of the weights
