"""RL-100: the denoising chain as a policy, chunk-level transitions and critics, and the staged CLI."""

import json
import re
import shutil
from dataclasses import replace
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch

from robodistill import checkpoints
from robodistill.data import Episode, load_episodes
from robodistill.policies.diffusion.chain import DenoisingChain
from robodistill.policies.diffusion.config import DiffusionConfig
from robodistill.policies.diffusion.policy import DiffusionPolicy
from robodistill.summary import READERS
from robodistill.training.critics import IQL, DynamicsEnsemble, Transitions, fqe, greedy_actions
from robodistill.evaluation import wilson_interval
from robodistill.training.rl100 import (chain_ppo_loss, clip_schedule, decision_advantages, gate_accepts, offline_advantage,
                                        plot_online, plot_ope)


def _policy(prediction_type: str = "sample", state_dim: int = 9) -> DiffusionPolicy:
    torch.manual_seed(0)
    cfg = DiffusionConfig(prediction_type=prediction_type, mlp_hidden=[64, 64])
    return DiffusionPolicy(cfg, state_dim, 4, -torch.ones(4), torch.ones(4)).eval()


@pytest.mark.parametrize("prediction_type", ["sample", "epsilon"])
def test_chain_mean_path_is_the_ddim_sampler_and_scores_its_own_draws(prediction_type):
    policy = _policy(prediction_type)
    chain = DenoisingChain(policy, steps=10, finetune_steps=4, std=0.1)
    cond = policy.condition({"state": torch.randn(5, 2, 9)})
    mean_path, _ = chain.sample(cond, torch.Generator().manual_seed(3), deterministic=True)
    policy.set_sampler("ddim", 10)
    ddim = policy.sampler(policy.denoiser, cond, (5, 16, 4), torch.Generator().manual_seed(3))
    assert torch.equal(mean_path[:, -1], ddim)  # a fine-tuned policy stays a plain ddim checkpoint

    drawn, logp = chain.sample(cond, torch.Generator().manual_seed(4))
    assert drawn.shape == (5, 11, 16, 4) and logp.shape == (5, 4)  # only the last K' steps carry a likelihood
    assert not torch.equal(drawn[:, -1], mean_path[:, -1])
    # Steps without a likelihood are not noised: from the same x_K a draw follows the mean path up to the K' steps.
    same_start, _ = chain.sample(cond, torch.Generator().manual_seed(3))
    first_noised = 1 + 10 - 4  # x_K, then the 6 steps without a likelihood
    assert torch.equal(same_start[:, :first_noised], mean_path[:, :first_noised])
    assert not torch.equal(same_start[:, first_noised], mean_path[:, first_noised])
    assert torch.allclose(chain.log_prob(cond, drawn), logp, atol=1e-6)
    # Moving a step's output away from its mean lowers its likelihood.
    moved = drawn.clone()
    moved[:, -1] += 0.3
    assert (chain.log_prob(cond, moved)[:, -1] < logp[:, -1]).all()


def test_a_chain_whose_weights_are_finite_and_outputs_are_not_raises_floating_point_error():
    """rl100 at offline.lr=1e6 left the denoiser's weights finite (no weight check fired) and its outputs NaN:
    torch's Normal raised "Expected parameter loc ... found invalid values" from deep inside the OPE gate."""
    policy = _policy()
    chain = DenoisingChain(policy, steps=4, finetune_steps=2)
    cond = policy.condition({"state": torch.randn(3, 2, 9)})
    drawn, _ = chain.sample(cond, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in policy.denoiser.parameters():
            p.fill_(1e30)
    assert all(bool(torch.isfinite(p).all()) for p in policy.denoiser.parameters())
    with pytest.raises(FloatingPointError, match="the denoising chain's mean is not finite"):
        chain.sample(cond, deterministic=True)
    with pytest.raises(FloatingPointError, match="the denoising chain's mean is not finite"):
        chain.log_prob(cond, drawn)


@pytest.mark.parametrize("std", [0.02, 0.1])
def test_chain_scores_its_own_draws_unclamped_at_any_exploration_std(std):
    """The chain's draws lie within noise_clip stds of their means, so no clamp may touch their
    likelihood, whatever the std: a fixed ceiling (DPPO's 2 nats) would flatten every draw near
    the mean at a small std, and with it PPO's gradient."""
    policy = _policy()
    chain = DenoisingChain(policy, steps=4, std=std)
    cond = policy.condition({"state": torch.randn(8, 2, 9)})
    drawn, logp = chain.sample(cond, torch.Generator().manual_seed(0))
    executed = slice(policy.obs_horizon - 1, policy.obs_horizon - 1 + policy.cfg.act_horizon)  # DPPO: executed actions only
    exact = torch.stack([torch.distributions.Normal(chain.mean(drawn[:, k], k, cond), std).log_prob(drawn[:, k + 1])[:, executed].flatten(1).mean(1)
                         for k in range(4)], 1)
    assert torch.allclose(logp, exact, atol=1e-5) and torch.allclose(chain.log_prob(cond, drawn), exact, atol=1e-5)


def test_transitions_reward_first_success_and_iql_values_near_the_goal_higher(pushcube_demos):
    episodes = load_episodes([pushcube_demos])
    policy = _policy(state_dim=episodes[0].obs["state"].shape[1])
    data = Transitions.from_episodes(episodes, DenoisingChain(policy), delta_actions=True, gamma=0.9)
    solved_at = [int(e.step_success.argmax()) + 1 for e in episodes]  # every demo succeeds
    assert len(data) == sum(solved_at) and int(data.first.sum()) == len(episodes)
    # The chunks that reach the first success (8 decision points per episode) end the episode; each is
    # rewarded gamma ** (its env steps before the solving one), and spans only the steps up to it.
    done = data.done.bool()
    assert int(done.sum()) == sum(min(8, n) for n in solved_at)
    assert torch.allclose(data.reward[done].sort().values, torch.tensor(sorted(0.9**j for n in solved_at for j in range(min(8, n)))))
    assert torch.allclose(data.discount[done], 0.9 * data.reward[done]) and not data.reward[~done].any()
    assert torch.allclose(data.discount[~done], torch.tensor(0.9**8))
    assert data.action.shape[1] == 8 * 4 and data.state.shape[1] == 2 * policy.dims["state_dim"]

    iql = IQL(data.state.shape[1], data.action.shape[1])
    iql.fit(data, steps=300, batch_size=128, gen=torch.Generator().manual_seed(0))
    with torch.no_grad():
        near, start = iql.value(data.state[data.done.bool()]).mean(), iql.value(data.state[data.first]).mean()
    assert near > start + 0.1  # a state one chunk from success is worth more than the start

    # The model ensemble disagrees more on actions the data never took: what the gate's AM-Q pays for.
    dynamics = DynamicsEnsemble(data.state.shape[1], data.action.shape[1], members=3)
    dynamics.fit(data, steps=300, batch_size=128, gen=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    seen = dynamics.step(data.state, data.action, gen)[2].mean()
    unseen = dynamics.step(data.state, data.action + 3.0, gen)[2].mean()
    assert unseen > 2 * seen


def test_transitions_pad_chunks_holding_still_without_a_gripper():
    # the padding kept the last action dim going, as if it were a gripper: an arm motion on a robot without one
    T = 5
    actions = np.random.default_rng(0).uniform(-0.5, 0.5, (T, 4)).astype(np.float32)
    episode = Episode(Path("synthetic.h5"), 0, 0, True, actions, {"state": np.zeros((T + 1, 9), np.float32)}, np.zeros(T, bool))
    data = Transitions.from_episodes([episode], DenoisingChain(_policy()), delta_actions=True, gamma=0.9)  # identity normalizers
    last = data.action[-1].reshape(8, 4)  # from the last step: a_4, then 7 steps past the end
    np.testing.assert_array_equal(last[0].numpy(), actions[-1])
    assert not last[1:].any()


@pytest.mark.parametrize("max_episode_steps", [100, 50])
def test_online_chunk_reward_is_discounted_to_the_chunk_start(pushcube_demos, max_episode_steps):
    """A demo replayed in chunks of 8: with 100 steps it is solved mid-chunk (reward gamma ** j at
    its j-th step); with PushCube's 50 it times out mid-chunk first and bootstraps V gamma ** (j + 1)."""
    from robodistill.envs import EnvConfig, make_env
    from robodistill.training.rl100 import play_chunk

    episode, h, gamma = load_episodes([pushcube_demos])[0], 8, 0.9
    # Where it is solved and the states it passes through are taken from a replay of the whole demo in a fresh env,
    # not from the demo's recording: after the push's contacts a replay drifts from the recording by machine (cube
    # orientation ~3e-3 within 5 steps of step 50 here, the fingers' velocities ~3e-2), while two replays of the same
    # actions from the same seed in this process are identical
    with make_env(EnvConfig(task="PushCube-v1", reward_mode="sparse", max_episode_steps=len(episode)), ignore_terminations=True) as env:
        replayed, solved = [env.reset(seed=[episode.seed])["state"][0]], []
        for action in torch.as_tensor(episode.actions):
            obs, _, _, _, info = env.step(action[None])
            replayed.append(obs["state"][0])
            solved.append(bool(info["success"][0]))
    end = min(solved.index(True), max_episode_steps - 1)  # the env step that ends the episode
    actions = torch.as_tensor(episode.actions[: (end // h + 1) * h])
    seen = []
    value_of = lambda hist: seen.append(hist) or torch.full((len(hist),), 5.0)  # noqa: E731
    with make_env(EnvConfig(task="PushCube-v1", reward_mode="sparse", max_episode_steps=max_episode_steps)) as env:
        obs = env.reset(seed=[episode.seed])
        hist = obs["state"].cpu().unsqueeze(1).repeat(1, 2, 1)
        for c in range(end // h + 1):
            reward, ended, hist, outcomes = play_chunk(env, actions[None, c * h: (c + 1) * h], hist, torch.zeros(4), gamma, value_of)
            assert bool(ended) == (c == end // h)
    j = end % h
    assert j > 0  # the episode ends mid-chunk, so a wrong discount shows
    if max_episode_steps == 100:
        assert outcomes == [True] and torch.allclose(reward, torch.tensor([gamma**j])) and not seen
    else:
        assert outcomes == [False] and torch.allclose(reward, torch.tensor([5.0 * gamma ** (j + 1)]))
        # V is asked about the observations the episode ended on (the last two steps' history), not the reset's
        assert torch.equal(seen[0][0], torch.stack(replayed[end : end + 2]))


SMALL = ["env.max_episode_steps=40", "imitation.iterations=40", "imitation.batch_size=32", "offline.iterations=1",
         "offline.collect_episodes=2", "offline.critic_steps=40", "offline.dynamics_steps=40", "offline.updates=4",
         "offline.gate_every=2", "offline.fqe_steps=40", "offline.gate_eval_episodes=2", "offline.batch_size=64",
         "online.env_steps=160", "online.decisions=4", "head.iterations=10", "eval_episodes=2"]


@pytest.fixture(scope="module")
def rl100_run(pushcube_demos, tmp_path_factory):
    from tests.conftest import run_cli

    root = tmp_path_factory.mktemp("rl100")
    r = run_cli("rl100", "env=PushCube-v1", f"dataset={pushcube_demos}", *SMALL, "offline.gate=both", f"hydra.run.dir={root / 'run'}", cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    return root / "run", r.stdout


def test_rl100_runs_every_stage_and_reports_gates(rl100_run):
    run, stdout = rl100_run
    report = json.loads((run / "report.json").read_text())
    assert list(report["stages"]) == ["imitation", "offline_iterations", "offline", "online", "distill"]
    for stage in ("imitation", "offline", "online", "distill"):
        assert report["stages"][stage]["episodes"] == 2
        assert 0 <= report["stages"][stage]["success_once"] <= 1
    decisions = report["decisions"]
    assert [d["update"] for d in decisions] == [2, 4]
    for d in decisions:  # both estimators and the true success, for every candidate
        assert {"amq", "amq_reference", "fqe", "fqe_reference", "true", "true_reference", "accepted"} <= set(d)
        assert d["accepted"] == (d["amq"] >= d["amq_reference"] and d["fqe"] >= d["fqe_reference"])  # gate=both
        assert 0 <= d["true_discounted"] <= d["true"] and 0 <= d["true_discounted_reference"] <= d["true_reference"]
        assert d["amq_disagreement"] > 0 and d["amq"] == pytest.approx(d["amq_q"] - 2.0 * d["amq_disagreement"])
    assert (run / "ope.png").stat().st_size > 1000 and "Gate decisions" in (run / "report.md").read_text()
    assert "one-step head" in stdout
    # Every stage's policy is an ordinary diffusion checkpoint; the head's has a consistency head.
    assert "consistency" in checkpoints.load(run / "distill" / "checkpoints" / "last.pt")
    assert checkpoints.load(run / "online" / "policy.pt")["kind"] == "diffusion"
    (line,) = READERS["rl100"](run)  # `robodistill summary`'s row: every stage's success with its interval
    assert all(f"{stage} " in line for stage in ("imitation", "offline", "online", "distill")) and "[" in line


def test_rl100_killed_while_rating_a_finished_stage_resumes_to_its_rating(rl100_run, pushcube_demos, cli, tmp_path):
    """Stopped after imitation (or the head) trained to its end but before the stage's success was reported: the
    resumed run rates that checkpoint; it does not refuse it as a finished training run."""
    run, _ = rl100_run
    copy = tmp_path / "runs" / "rl100" / "2026-01-01_00-00-00-copy"
    shutil.copytree(run, copy)
    report = json.loads((copy / "report.json").read_text())
    for stage in ("imitation", "distill"):
        del report["stages"][stage]
    (copy / "report.json").write_text(json.dumps(report))
    trained = {stage: (copy / stage / "checkpoints" / "last.pt").stat().st_mtime_ns for stage in ("imitation", "distill")}
    r = cli("rl100", f"dataset={pushcube_demos}", *SMALL, "stages=[imitation,distill]", f"resume_from={copy}")
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((copy / "report.json").read_text())
    assert all(report["stages"][stage]["episodes"] == 2 for stage in ("imitation", "distill"))
    assert trained == {stage: (copy / stage / "checkpoints" / "last.pt").stat().st_mtime_ns for stage in trained}  # not trained again


def test_rl100_imitation_resumed_reads_its_checkpoint_once(rl100_run, pushcube_demos, tmp_path, monkeypatch):
    """Once to see whether the stage is done, once more in train-teacher to go on from it: one read serves both."""
    from robodistill.envs import EnvConfig
    from robodistill.training.rl100 import ImitationConfig, RL100Config, Run, imitation

    shutil.copytree(rl100_run[0] / "imitation", tmp_path / "imitation")
    last = (tmp_path / "imitation" / "checkpoints" / "last.pt").resolve()
    reads, load = [], checkpoints.load
    monkeypatch.setattr(checkpoints, "load", lambda path, *a, **kw: reads.append(Path(path).resolve()) or load(path, *a, **kw))
    cfg = RL100Config(env=EnvConfig(task="PushCube-v1", max_episode_steps=40), dataset=str(pushcube_demos),
                      imitation=ImitationConfig(iterations=50, batch_size=32))
    imitation(cfg, Run(tmp_path))
    assert reads.count(last) == 1 and checkpoints.load(last)["step"] == 50


def test_rl100_resumed_with_another_init_is_refused_in_one_line(rl100_run, pushcube_demos, cli, tmp_path):
    """A run past its imitation stage, resumed with init=: the policy was rated and reported as the run's start while
    the finished imitation stage went on in its place."""
    run, _ = rl100_run
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    report = json.loads((copy / "report.json").read_text())
    del report["stages"]["distill"]  # killed while rating the head: one stage left to do
    (copy / "report.json").write_text(json.dumps(report))
    other = run / "online" / "policy.pt"
    r = cli("rl100", f"dataset={pushcube_demos}", *SMALL, "stages=[offline,online,distill]", f"init={other}", f"resume_from={copy}")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        f"error: init={other}: {copy} started from {copy / 'imitation' / 'checkpoints' / 'last.pt'}; resume it with no init=, "
        f"or start a new run from init={other}"), r.stderr[-2000:]
    assert "init" not in json.loads((copy / "report.json").read_text())["stages"]


def test_rl100_resuming_a_finished_run_says_there_is_nothing_left(rl100_run, pushcube_demos, cli_here):
    """It exited 0 reprinting the old report, dropping a budget raised now (online.env_steps=) unsaid."""
    run, _ = rl100_run
    report = (run / "report.json").read_text()
    r = cli_here("rl100", f"dataset={pushcube_demos}", *SMALL, "online.env_steps=320", f"resume_from={run}")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        f"error: {run} has already run stages=[imitation,offline,online,distill]: resuming it has nothing left to do (a "
        f"finished stage is kept as it ran, whatever its settings now); to train further, start a new run from one of "
        f"its stages' policies, e.g. stages=[online,distill] init={run / 'online' / 'policy.pt'}"), r.stderr[-2000:]
    assert (run / "report.json").read_text() == report


def _stopped_before_the_head(run: Path) -> None:
    """As if `run` was killed after its online stage: the head's stage is left to do."""
    report = json.loads((run / "report.json").read_text())
    del report["stages"]["distill"]
    (run / "report.json").write_text(json.dumps(report))
    shutil.rmtree(run / "distill")


def test_rl100_resumed_by_its_name_alone_goes_on_as_it_was_started(rl100_run, pushcube_demos, tmp_path):
    """`rl100 resume=true name=<run>` took only the run's env: it ended "dataset= is required for the imitation and
    offline stages", and one that gave the data but not a budget went on with the default's. It takes every setting of
    the run now, its data and start found from any directory; a budget raised on resuming is kept for the next resume."""
    from omegaconf import OmegaConf

    from tests.conftest import run_cli

    start = tmp_path / "start"
    start.mkdir()
    shutil.copy(rl100_run[0] / "imitation" / "checkpoints" / "last.pt", start / "teacher.pt")
    for suffix in (".h5", ".json"):
        shutil.copy(pushcube_demos.with_suffix(suffix), start / f"demos{suffix}")
    r = run_cli("rl100", "env=PushCube-v1", "dataset=demos.h5", "init=teacher.pt", "stages=[distill]", "env.max_episode_steps=40",
                "eval_episodes=2", "chain.steps=5", "chain.finetune_steps=5", "head.iterations=10", "seed=3", "name=again",
                cwd=start)
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = (start / "runs" / "rl100").iterdir()
    started = OmegaConf.load(run / ".hydra" / "config.yaml")
    assert (started.dataset, started.init) == (str(start / "demos.h5"), str(start / "teacher.pt"))

    def head_trained(report: dict) -> int:
        assert report["stages"]["distill"]["episodes"] == 2 and set(report["stages"]) == {"init", "distill"}
        return checkpoints.load(run / "distill" / "checkpoints" / "last.pt")["consistency"]["step"]

    # From another directory, by the run's directory, with a larger budget for the head.
    _stopped_before_the_head(run)
    r = run_cli("rl100", f"resume_from={run}", "head.iterations=12", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"as the resumed run was trained: dataset={start / 'demos.h5'} init={start / 'teacher.pt'} stages=[distill] eval_episodes=2 " \
           "seed=3 chain.steps=5 chain.finetune_steps=5 " in r.stdout
    assert head_trained(json.loads((run / "report.json").read_text())) == 12
    resumed = OmegaConf.load(run / ".hydra" / "config.yaml")
    assert resumed.head.iterations == 12 and OmegaConf.merge(started, {"head": {"iterations": 12}}) == resumed
    assert not (tmp_path / "runs" / "rl100").exists()  # the directory hydra made for it went

    # By its name alone: the budget raised is the run's now.
    _stopped_before_the_head(run)
    r = run_cli("rl100", "resume=true", "name=again", cwd=start)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "head.iterations=12" in r.stdout and head_trained(json.loads((run / "report.json").read_text())) == 12
    assert OmegaConf.load(run / ".hydra" / "config.yaml") == resumed and [p.name for p in run.parent.iterdir()] == [run.name]


@pytest.mark.parametrize(("given", "why"), [
    ("seed=1", "runs with seed=0, which every stage trains or is rated with"),
    ("chain.steps=5", "runs with chain.steps=10, which every stage trains or is rated with"),
    ("online.env_steps=320", "runs with online.env_steps=160, and its finished online stage is kept as it ran"),
])
def test_rl100_resume_that_changes_what_its_stages_ran_with_is_refused_in_one_line(rl100_run, cli_here, tmp_path, given, why):
    """A resume goes on with the run's settings; one given another value that its finished stages' results (or every
    stage's) depend on would leave them inconsistent with the rest, so it is refused, the run untouched."""
    copy = tmp_path / "copy"
    shutil.copytree(rl100_run[0], copy)
    _stopped_before_the_head(copy)
    before = {p: (copy / p).read_text() for p in ("report.json", ".hydra/config.yaml")}
    r = cli_here("rl100", f"resume_from={copy}", given)
    key = given.split("=")[0]
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        f"error: {given}: {copy} {why}; drop {key}= to resume it, or start a new run with {given}"), r.stderr[-2000:]
    assert before == {p: (copy / p).read_text() for p in before}


def test_rl100_resume_that_changes_the_shape_of_its_unfinished_offline_stage_s_saved_state_is_refused_in_one_line(rl100_run, cli_here,
                                                                                                                   tmp_path):
    """offline/state.pt holds offline.ensemble dynamics models: a resume that changed it, allowed for a stage that has not
    finished, ended in load_state_dict's traceback (Error(s) in loading state_dict for DynamicsEnsemble)."""
    copy = tmp_path / "copy"
    shutil.copytree(rl100_run[0], copy)
    report = json.loads((copy / "report.json").read_text())
    for stage in ("offline", "online", "distill"):  # killed after the offline stage's last checkpoint, before its policy
        del report["stages"][stage]
    (copy / "report.json").write_text(json.dumps(report))
    (copy / "offline" / "policy.pt").unlink()
    before = {p: (copy / p).read_text() for p in ("report.json", ".hydra/config.yaml")}
    r = cli_here("rl100", f"resume_from={copy}", "offline.ensemble=3")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        f"error: offline.ensemble=3: {copy} runs with offline.ensemble=5, which shapes its unfinished offline stage's saved state "
        "(offline/state.pt); drop offline.ensemble= to resume it, or start a new run with offline.ensemble=3"), r.stderr[-2000:]
    assert before == {p: (copy / p).read_text() for p in before}


def test_rl100_gate_that_accepts_nothing_keeps_the_start_and_offline_resumes(rl100_run, pushcube_demos, cli, tmp_path):
    run, _ = rl100_run
    init = run / "imitation" / "checkpoints" / "last.pt"
    out = tmp_path / "runs" / "rl100" / "2026-01-01_00-00-00-gated"  # where `name=gated` would have put it
    small = [a for a in SMALL if not a.startswith("env.max_episode_steps=")]
    args = ["rl100", "env=PushCube-v1", f"dataset={pushcube_demos}", *small, "env.max_episode_steps=30", "stages=[offline]",
            f"init={init}", "offline.gate_margin=-1e9", f"hydra.run.dir={out}"]
    r = cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["decisions"] and not any(d["accepted"] for d in report["decisions"])
    start, kept = checkpoints.load(init)["ema"], checkpoints.load(out / "offline" / "policy.pt")["ema"]
    assert all(torch.equal(start[k], kept[k]) for k in start)  # rejected candidates never replace the reference

    # A run killed after iteration 1 continues from offline/state.pt: only iteration 2 runs, its critics' and
    # dynamics' Adam moments carried on (they are refitted from where they were each iteration).
    state = checkpoints.load(out / "offline" / "state.pt")
    assert all(opt["state"] for opt in (state["iql_optimizer"], state["dynamics_optimizer"]))
    (out / "offline" / "policy.pt").unlink()
    del report["stages"]["offline"]
    (out / "report.json").write_text(json.dumps(report))
    # One written before the buffer carried per-step discounts is refused in a line, not a TypeError.
    old = tmp_path / "old" / "offline" / "state.pt"
    checkpoints.save(old, {**state, "buffer": {k: v for k, v in state["buffer"].items() if k != "discount"}})
    r = cli(*args[:-1], f"hydra.run.dir={old.parent.parent}")
    assert r.returncode == 2 and f"{old} was written by an older robodistill" in r.stderr, r.stderr[-2000:]
    # Resumed without its episode limit: the run goes on in the env it trained in (30), not init='s (40); and in
    # its own directory (`resume=true` finds it by name), so the new one it was given is gone.
    r = cli(*[a for a in args[:-1] if not a.startswith("env.max_episode_steps=")], "offline.iterations=2", "name=gated", "resume=true")
    assert r.returncode == 0, r.stderr[-3000:]
    assert [p.name for p in out.parent.iterdir()] == [out.name]
    assert "offline: resumed after iteration 1" in r.stdout + r.stderr
    assert "as the resumed run was trained: env.max_episode_steps=30" in r.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["env"]["max_episode_steps"] == 30 == checkpoints.load(out / "offline" / "policy.pt")["env"]["max_episode_steps"]
    assert [it["iteration"] for it in report["stages"]["offline_iterations"]] == [1, 2]


def test_rl100_online_critic_warmup_holds_the_actor_until_it_ends(rl100_run, cli, tmp_path):
    run, _ = rl100_run
    init = run / "imitation" / "checkpoints" / "last.pt"
    start = checkpoints.load(init)["ema"]
    for warmup, moved in ((5, False), (4, True)):  # SMALL's online stage makes 5 updates
        out = tmp_path / f"warmup{warmup}"
        r = cli("rl100", "env=PushCube-v1", *SMALL, "stages=[online]", f"init={init}", f"online.critic_warmup={warmup}",
                f"hydra.run.dir={out}")
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.rstrip().endswith("(json: report.json, online curves: online.png)") and not (out / "ope.png").exists()
        history = checkpoints.load(out / "online" / "state.pt")["history"]
        assert len(history) == 5
        after = checkpoints.load(out / "online" / "policy.pt")["ema"]
        assert any(not torch.equal(start[k], after[k]) for k in start) == moved
        # Every update logs how well V explains the returns; only actor updates log how far the chain moved.
        assert all(np.isfinite(row["explained_variance"]) and row["explained_variance"] <= 1 for row in history)
        assert all(row["approx_kl"] is None and row["clip_frac"] is None for row in history[:warmup])
        assert all(row["approx_kl"] >= 0 and 0 <= row["clip_frac"] <= 1 for row in history[warmup:])


def test_rl100_that_diverges_ends_in_one_line(rl100_run, tmp_path):
    # The chain's weights stayed finite and its outputs went NaN: torch's "Expected parameter loc" traceback. A critic
    # that diverged first sent NaN advantages to the actor, which then ended as if online.lr were too high.
    from robodistill.envs import EnvConfig
    from robodistill.errors import UserError
    from robodistill.training.rl100 import OnlineConfig, RL100Config, run_stages

    init = rl100_run[0] / "imitation" / "checkpoints" / "last.pt"
    for i, (online, line) in enumerate((
            (OnlineConfig(lr=1e6), "the denoising chain's actions stopped being finite in the online stage: training diverged at "
                                   "online.lr=1e+06: lower online.lr= and start again"),
            (OnlineConfig(critic_lr=1e30), "the critic's loss stopped being finite by env step 32: training diverged at "
                                           "online.critic_lr=1e+30: lower online.critic_lr= and start again"))):
        cfg = RL100Config(env=EnvConfig(task="PushCube-v1", max_episode_steps=40), init=str(init), stages=["online"],
                          online=replace(online, env_steps=64, decisions=4), eval_episodes=1)
        with pytest.raises(UserError, match=f"^{re.escape(line)}$"):
            run_stages(cfg, tmp_path / str(i))


def test_rl100_seed_layout_keeps_training_apart_from_evaluations_and_other_seeds():
    """Collection seeds (30,000 + 1000 x iteration + seed) reached the online evaluations that pick the kept policy
    (50,000 + 1000 x seed) at 20 iterations, online ones (40,000 + 100 x seed + ...) after 10,000 seeded starts, and
    seeds 0 and 1 trained on nearly the same states. Checked at the largest budgets check() lets through: every seed a
    purpose may use, for every run seed rl100 takes."""
    from robodistill.evaluation import HELD_OUT_SEEDS
    from robodistill.training.rl100 import RUN_SEEDS, SEEDS, collect_seeds, env_seed

    def window(purpose, run_seed):  # (first, last) seed the purpose may reset with
        return env_seed(purpose, run_seed), env_seed(purpose, run_seed, SEEDS[purpose][1] - 1)

    training = ("collect", "online", "collect_draws")  # the last torch's seeds: no reset seed's either (torch keeps 32 bits)
    evaluations = [p for p in SEEDS if p not in training]
    assert set(evaluations) == {"rating", "gate_truth", "online_eval"}
    trained = sorted(window(p, s) for p in training for s in range(RUN_SEEDS))
    assert all(a[1] < b[0] for a, b in pairwise(trained))  # no two purposes or run seeds train on one seed
    spans = {p: (min(window(p, s)[0] for s in range(RUN_SEEDS)), max(window(p, s)[1] for s in range(RUN_SEEDS))) for p in evaluations}
    for lo, hi in spans.values():
        assert all(last < lo or hi < first for first, last in trained)
    # Selection on the online evaluations would flatter the stage's rating if they shared a seed.
    assert spans["rating"][1] < spans["online_eval"][0] or spans["online_eval"][1] < spans["rating"][0]
    assert 0 <= min(lo for lo, _ in spans.values()) and trained[-1][1] < 2**32  # ManiSkill's seeds
    assert spans["rating"][0] > 9_999  # `robodistill demos seed=0` plans from 0 on
    # The stages' ratings keep the seeds published results were rated on: HELD_OUT_SEEDS + seed + episode.
    assert [env_seed("rating", s, k) for s, k in ((0, 0), (2, 199))] == [HELD_OUT_SEEDS, HELD_OUT_SEEDS + 201]
    # Collection's torch seed (its later episodes' starts) as laid out: one per run seed and iteration, each iteration's
    # first reset seed after the last one's envs.
    assert [collect_seeds(s, it, 4) for s, it in ((0, 1), (RUN_SEEDS - 1, 3))] == [
        (env_seed("collect", 0), env_seed("collect_draws", 0)),
        (env_seed("collect", RUN_SEEDS - 1, 8), env_seed("collect_draws", RUN_SEEDS - 1, 2))]


def test_rl100_resets_its_envs_with_the_seed_layout(rl100_run, pushcube_demos, tmp_path, monkeypatch):
    """Every seed the stages reset an env with is the layout's (env_seed), for each purpose; a budget past a block is
    refused before it trains."""
    from robodistill.envs import EnvConfig
    from robodistill.envs.vector import VecEnv
    from robodistill.errors import UserError
    from robodistill.training.rl100 import OfflineConfig, OnlineConfig, RL100Config, env_seed, run_stages

    seeds = []
    reset = VecEnv.reset

    def recording_reset(self, seed=None, rebuild=False):
        seeds.extend([] if seed is None else np.atleast_1d(seed).tolist())
        return reset(self, seed, rebuild)

    monkeypatch.setattr(VecEnv, "reset", recording_reset)
    init = rl100_run[0] / "imitation" / "checkpoints" / "last.pt"
    cfg = RL100Config(env=EnvConfig(task="PushCube-v1", max_episode_steps=40), dataset=str(pushcube_demos), init=str(init),
                      stages=["offline", "online"], eval_episodes=1, seed=1,
                      offline=OfflineConfig(iterations=2, collect_episodes=2, critic_steps=10, dynamics_steps=10, updates=2,
                                            gate_every=2, fqe_steps=10, gate_eval_episodes=1, batch_size=32),
                      online=OnlineConfig(env_steps=32, decisions=4, eval_every=1, eval_episodes=1))
    run_stages(cfg, tmp_path / "run")
    assert sorted(set(seeds)) == sorted({env_seed("rating", 1), env_seed("gate_truth", 1), env_seed("collect", 1, 0),
                                         env_seed("collect", 1, 1), env_seed("online", 1), env_seed("online_eval", 1)})
    with pytest.raises(UserError, match=r"^online\.env_steps=10000000000000 \(online\.envs=1, online\.decisions=4\): needs "):
        run_stages(replace(cfg, stages=["online"], online=replace(cfg.online, env_steps=10**13)), tmp_path / "huge")


def test_rl100_online_keeps_its_best_evaluated_policy(rl100_run, cli, tmp_path):
    run, _ = rl100_run
    init = run / "imitation" / "checkpoints" / "last.pt"
    out = tmp_path / "keep"
    r = cli("rl100", "env=PushCube-v1", *SMALL, "stages=[online]", f"init={init}", "online.eval_every=2", "online.eval_episodes=2",
            f"hydra.run.dir={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    evals = report["online_evals"]
    assert [e["updates"] for e in evals] == [0, 2, 4, 5]  # the start, every 2 updates, and the last
    first_best = max(range(len(evals)), key=lambda i: (evals[i]["success_once"], -i))  # ties keep the earlier policy
    assert report["online_kept"] == {k: evals[first_best][k] for k in ("env_steps", "success_once")}
    start, kept = checkpoints.load(init)["ema"], checkpoints.load(out / "online" / "policy.pt")["ema"]
    assert all(torch.equal(start[k], kept[k]) for k in start) == (first_best == 0)
    assert "kept the policy at" in (out / "report.md").read_text() and (out / "online.png").stat().st_size > 1000

    # Evaluating does not change what is trained: the same updates as a run that never evaluates (the
    # simulator's auto-resets draw from torch's global RNG, which the evaluations' sampling also uses).
    # Without env.max_episode_steps the run takes init's own 40-step episodes (not the config's 100), or it could not match.
    plain = tmp_path / "plain"
    unlimited = [a for a in SMALL if not a.startswith("env.max_episode_steps=")]
    r = cli("rl100", "env=PushCube-v1", *unlimited, "stages=[online]", f"init={init}", f"hydra.run.dir={plain}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "as the init= policy was trained: env.max_episode_steps=40" in r.stdout, r.stdout[-2000:]
    trained = lambda d: [{k: row[k] for k in ("train_success", "pi_loss", "v_loss")} for row in json.loads((d / "report.json").read_text())["online_history"]]  # noqa: E731
    assert trained(out) == trained(plain)


def test_an_rl100_policy_teaches_rpd_in_the_episodes_it_was_trained_in(rl100_run, cli, tmp_path):
    run, _ = rl100_run
    teacher = run / "imitation" / "checkpoints" / "last.pt"
    r = cli("rpd", f"teacher={teacher}", "total_steps=40", "n_steps=20", "batch_size=20", "n_epochs=1", "hidden=[32,32]",
            "eval_episodes=1", "obs_norm_steps=20", "name=t")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "as the teacher was trained: env.max_episode_steps=40" in r.stdout, r.stdout[-2000:]
    (student,) = (tmp_path / "runs" / "rpd").glob("*-t/student.zip")
    rated = cli("eval", f"policy={student}", "episodes=1", "name=s")
    assert rated.returncode == 0 and "as the policy was trained: env.max_episode_steps=40" in rated.stdout, rated.stderr[-2000:]


def test_online_plot_draws_evaluations_at_0_and_100_percent(tmp_path):
    # 100/100's Wilson bound came out as 1 - 1.1e-16, below the rate: a negative error bar, which matplotlib refuses
    evals = [{"env_steps": 100 * (i + 1), "success_once": k / n, "ci95": list(wilson_interval(k, n)), "episodes": n}
             for i, (k, n) in enumerate([(0, 11), (6, 6), (100, 100)])]
    assert all(e["ci95"][0] <= e["success_once"] <= e["ci95"][1] for e in evals)
    history = [{"env_steps": 100, "train_success": 1.0, "explained_variance": 0.1, "approx_kl": 0.01, "clip_frac": 0.1}]
    plot_online(history, evals, tmp_path / "online.png")
    assert (tmp_path / "online.png").stat().st_size > 0


def test_online_plot_of_updates_in_which_no_episode_ended_warns_of_nothing(tmp_path):
    """At tiny budgets no rollout episode ends within an update and nothing is evaluated: the success panel has nothing
    to label, and matplotlib's "No artists with labels found to put in legend" warning was printed in the run's output."""
    import warnings

    history = [{"env_steps": 32, "train_success": None, "explained_variance": 0.1, "approx_kl": 0.01, "clip_frac": 0.1}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_online(history, [], tmp_path / "online.png")
    assert (tmp_path / "online.png").stat().st_size > 0


def test_gate_and_online_plots_read_close_estimates_and_a_single_update(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    drawn, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig: drawn.append(fig) or close(fig))  # kept to look at, still closed
    # gate candidates whose estimates differ in the fifth decimal, as they do
    decisions = [{"amq_q": 0.83121 + i * 1e-5, "fqe": 0.5 + i * 1e-6, "true_discounted": 0.61 + i * 1e-5, "accepted": i != 1}
                 for i in range(3)]
    plot_ope(decisions, tmp_path / "ope.png")
    fig = drawn[-1]
    canvas = FigureCanvasAgg(fig)  # pyplot's close detached its own
    canvas.draw()
    renderer = canvas.get_renderer()
    for ax, key in zip(fig.axes, ("amq_q", "fqe")):
        for axis, values in ((ax.xaxis, [d[key] for d in decisions]), (ax.yaxis, [d["true_discounted"] for d in decisions])):
            assert axis.get_offset_text().get_text() == ""  # was 1e-5+8.312e-1, over the axis label
            ticks = [t for t in axis.get_ticklabels() if t.get_text()]
            shown = [float(t.get_text()) for t in ticks]
            assert min(shown) <= min(values) + 1e-5 and max(values) - 1e-5 <= max(shown) <= 1
            boxes = [t.get_window_extent(renderer) for t in ticks]
            assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:]), [t.get_text() for t in ticks]
    # online.iterations=1: one update, drawn as points, not as lines through one point that draw nothing
    plot_online([{"env_steps": 100, "train_success": 0.5, "explained_variance": 0.1, "approx_kl": 0.01, "clip_frac": 0.1}], [],
                tmp_path / "online.png")
    assert all(line.get_marker() == "o" for ax in drawn[-1].axes[1:] for line in ax.lines if len(line.get_xdata()) == 1)
    assert sum(len(ax.lines) for ax in drawn[-1].axes[1:]) >= 3


def test_online_clip_schedule_tightens_toward_the_noisiest_step():
    dppo = clip_schedule(0.01, 0.001, 10)  # DPPO's robomimic setting
    assert dppo[0].item() == pytest.approx(0.001) and dppo[-1].item() == pytest.approx(0.01)
    assert (dppo.diff() > 0).all()
    assert dppo[4] < 0.0055  # exponential: most of the steps stay near the noisiest step's clip
    assert torch.equal(clip_schedule(0.2, None, 3), torch.full((3,), 0.2))
    assert clip_schedule(0.01, 0.001, 1).tolist() == pytest.approx([0.01])  # one fine-tuned step: the last step's clip


def test_chain_ppo_loss_weights_the_shared_advantage_by_the_denoising_discount():
    adv = torch.tensor([1.0, -2.0, 0.5])

    def grad(**kw) -> torch.Tensor:
        log_ratio = torch.zeros(3, 4, requires_grad=True)  # at the reference: every ratio 1, none clipped
        chain_ppo_loss(log_ratio, adv, clip_schedule(0.2, 0.01, 4), **kw)[0].backward()
        return log_ratio.grad

    equal = grad()
    assert torch.allclose(equal, -adv[:, None].expand(3, 4) / 12)  # RL-100: every step the same advantage
    dppo = grad(denoise_discount=0.9)
    assert torch.allclose(dppo, equal * torch.tensor([0.9**3, 0.9**2, 0.9, 1.0]))  # the noisiest step (first) least
    # Past the clip the surrogate is flat: a ratio far above 1 with a positive advantage gets no gradient.
    log_ratio = torch.full((1, 4), 0.5, requires_grad=True)
    chain_ppo_loss(log_ratio, torch.ones(1), 0.2)[0].backward()
    assert not log_ratio.grad.any()


def test_online_advantages_discount_a_decision_by_gamma_to_the_act_horizon_and_stop_at_an_episode_s_end():
    """2 decisions x 2 envs of 2 env steps each, gamma 0.9 (0.81 a decision), lambda 0.5. Env 0's episode is solved in
    decision 0, env 1's times out in decision 1 (its reward 0.5 holds play_chunk's bootstrap): neither takes a bootstrap
    from the decision after, the new episode's. By hand:
    env 0: A_1 = 0 + 0.81 * 2.0 - 0.4 = 1.22, A_0 = 1 - 0.5 = 0.5 (nothing carried back from decision 1)
    env 1: A_1 = 0.5 - 0.3 = 0.2 (no 0.81 * 3.0), A_0 = (0.81 * 0.3 - 0.2) + 0.81 * 0.5 * 0.2 = 0.124"""
    reward, ended = torch.tensor([[1.0, 0.0], [0.0, 0.5]]), torch.tensor([[True, False], [False, True]])
    value = torch.tensor([[0.5, 0.2], [0.4, 0.3]])
    adv, returns = decision_advantages(reward, ended, value, torch.tensor([2.0, 3.0]), gamma=0.9, act_horizon=2, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.124], [1.22, 0.2]]))
    torch.testing.assert_close(returns, adv + value)


def test_the_gate_accepts_a_candidate_only_if_every_estimator_it_names_says_no_worse():
    ref = {"amq": 1.0, "fqe": 0.5}
    split = {"amq": 1.5, "fqe": 0.25}  # AM-Q says better, FQE worse
    assert not gate_accepts(split, ref, "both", 0.0)
    assert gate_accepts(split, ref, "amq", 0.0) and not gate_accepts(split, ref, "fqe", 0.0)
    assert gate_accepts({"amq": 1.0, "fqe": 0.5}, ref, "both", 0.0)  # a tie is no worse
    assert gate_accepts({"amq": 0.75, "fqe": 0.5}, ref, "both", 0.25)  # worse by no more than the margin
    assert not gate_accepts({"amq": 0.5, "fqe": 0.5}, ref, "both", 0.25)


def test_rl100_bad_input_is_one_clear_line(cli_here, tmp_path):
    checkpoints.save(tmp_path / "agv.pt", {"kind": "agv_ppo"})  # a checkpoint, of another command's policy
    for args, message in {
        ("init=agv.pt", "stages=[online]"): "agv.pt holds a 'agv_ppo', not a Diffusion Policy checkpoint",
        ("stages=[offline]",): "give init=",
        ("stages=[warmup]",): "stages=['warmup']",
        ("env.obs_mode=rgb", "dataset=x.h5"): "env.obs_mode=state",
        ("init=nope.pt", "stages=[online]"): "init=nope.pt: no such checkpoint file",
        ("init=nope.pt", "dataset=x.h5"): "init=nope.pt and the imitation stage both give the starting policy",
        ("eval_episodes=0", "dataset=x.h5"): "eval_episodes=0 and offline.gate_eval_episodes=20 must be >= 1",
        ("offline.gate=median", "dataset=x.h5"): "offline.gate='median' is not one of amq, fqe, both",
        ("offline.amq_penalty=-1", "dataset=x.h5"): "offline.amq_penalty=-1.0: must be >= 0",
        ("online.critic_warmup=-1", "dataset=x.h5"): "online.critic_warmup=-1 must be >= 0",
        ("online.clip_noisiest=0", "dataset=x.h5"): "online.clip_noisiest=0.0 must be > 0",
        ("online.eval_every=-1", "dataset=x.h5"): "online.eval_every=-1 must be >= 0",
        ("online.denoise_discount=0", "dataset=x.h5"): "online.denoise_discount=0.0 must be in (0, 1]",
        ("env.control_mode=pd_ee_pose", "dataset=x.h5"): "env.control_mode=pd_ee_pose: the online stage holds",
        ("dataset=x.h5",): "dataset=x.h5: no such file x.h5",
        ("seed=1000", "dataset=x.h5"): "seed=1000: rl100 takes a seed from 0 to 999",
        ("eval_episodes=9000001", "dataset=x.h5"): "eval_episodes=9000001: needs 9,000,001 seeded rating episodes per run, past the 9,000,000",
        ("online.eval_episodes=9000001", "dataset=x.h5"): "online.eval_episodes=9000001: needs 9,000,001 seeded online_eval episodes",
        ("offline.iterations=500001", "env.num_envs=2", "dataset=x.h5"):
            "offline.iterations=500001 (x env.num_envs=2): needs 1,000,002 seeded collect episodes per run, past the 1,000,000",
    }.items():
        r = cli_here("rl100", *args)
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr[-2000:])
        assert "Traceback" not in r.stderr
    assert not list(tmp_path.glob("runs/rl100/*"))  # bad input leaves no run behind


def test_a_report_the_disk_has_no_room_for_says_so_and_keeps_the_one_there(tmp_path):
    # report.md was written in place: OSError's traceback, and a cut-short table where the last one was
    from robodistill.errors import CutShort
    from robodistill.training.rl100 import Run
    from tests.conftest import disk_full_past

    run = Run(tmp_path)
    run.save_report()
    before = (tmp_path / "report.md").read_text()
    with disk_full_past(60), pytest.raises(CutShort, match=r"could not write .*report.md: File too large \(report.md as it was is kept\)"):
        run.save_report()
    assert (tmp_path / "report.md").read_text() == before and sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md"]


def test_plot_of_an_rl100_run_says_where_its_curves_are(rl100_run, cli_here, tmp_path):
    """It said the run was not a training command's and to give runs/<command>/<run>, which it was."""
    run, _ = rl100_run
    r = cli_here("plot", str(run), "--out", str(tmp_path / "curves.png"))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: {run} is a run of rl100, which plot does not draw: it draws its own: each stage's success in report.md, "
        "the online stage in online.png, the offline gate's decisions in ope.png"], r.stderr[-2000:]
    assert not (tmp_path / "curves.png").exists()


def test_rl100_offline_and_online_stages_write_tensorboard(rl100_run):
    """Of rl100's stages only imitation and distill (the trainers it runs) wrote TensorBoard; its RL stages, the long
    ones, showed how they went only once they had ended (online.png, ope.png)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = rl100_run
    report = json.loads((run / "report.json").read_text())

    def logged(stage: str, tag: str) -> list[tuple[int, float]]:
        events = EventAccumulator(str(run / stage / "tb"))
        events.Reload()
        return [(e.step, e.value) for e in events.Scalars(tag)]

    # each gate decision against the offline PPO updates made (SMALL: one iteration of 4, a decision every 2)
    assert logged("offline", "offline/gate/true") == [(d["update"], pytest.approx(d["true"], rel=1e-5)) for d in report["decisions"]]
    assert [s for s, _ in logged("offline", "offline/iteration/collect_success")] == [4]
    # each online update against env steps
    assert logged("online", "online/v_loss") == [(r["env_steps"], pytest.approx(r["v_loss"], rel=1e-5)) for r in report["online_history"]]


def test_rl100_offline_killed_between_its_report_and_checkpoint_keeps_each_gate_decision_once(rl100_run, pushcube_demos, cli, tmp_path):
    """The report was saved after offline/state.pt, so a kill between them lost the iteration's gate decisions (the
    iteration done, its rows in no report); saved before, the resumed run makes them again and drops the kept ones."""
    run, _ = rl100_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    report = json.loads((copy / "report.json").read_text())
    for stage in ("offline", "online", "distill"):
        del report["stages"][stage]
    (copy / "report.json").write_text(json.dumps(report))  # the report of iteration 1 saved, then killed before its
    (copy / "offline" / "state.pt").unlink()  # checkpoint
    (copy / "offline" / "policy.pt").unlink()
    r = cli("rl100", f"dataset={pushcube_demos}", *SMALL, "stages=[offline]", f"resume_from={copy}")
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((copy / "report.json").read_text())
    assert [(d["iteration"], d["update"]) for d in report["decisions"]] == [(1, 2), (1, 4)]
    assert [it["iteration"] for it in report["stages"]["offline_iterations"]] == [1]


def test_transitions_decide_from_the_history_at_the_chunk_start_and_go_on_from_the_one_at_its_end():
    T, oh = 20, 2
    states = np.arange(T + 1, dtype=np.float32)[:, None].repeat(9, 1)  # state i is i everywhere
    success = np.zeros(T, bool)
    success[15] = True  # solved by the 16th action: 16 decisions
    episode = Episode(Path("synthetic.h5"), 0, 0, True, np.zeros((T, 4), np.float32), {"state": states}, success)
    data = Transitions.from_episodes([episode], DenoisingChain(_policy()), delta_actions=True, gamma=0.9)  # identity normalizers
    assert len(data) == 16
    for t in range(16):
        stop = min(t + 8, 16)  # a chunk spans 8 env steps, or up to the solving one
        assert data.state[t].view(oh, 9)[:, 0].tolist() == [max(t - 1, 0), t]
        assert data.next_state[t].view(oh, 9)[:, 0].tolist() == [stop - 1, stop]


def _one_state_two_actions(n: int = 64) -> Transitions:
    """One state where one action solves the task (reward 1) and the other fails (reward 0), taken equally often;
    both end the episode (a bootstrap from V(next state) would add 0.9 V to both)."""
    state = torch.zeros(n, 3)
    action = torch.tensor([[1.0], [-1.0]]).repeat(n // 2, 1)
    return Transitions(state, action, (action[:, 0] > 0).float(), torch.full((n,), 0.9), state.clone(), torch.ones(n),
                       torch.ones(n, dtype=torch.bool))


def test_iql_fits_v_to_the_upper_expectile_of_q_without_bootstrapping_past_the_end():
    data = _one_state_two_actions()
    torch.manual_seed(0)
    iql = IQL(3, 1, expectile=0.7, hidden=(32, 32))
    iql.fit(data, steps=1000, batch_size=64, gen=torch.Generator().manual_seed(0))
    with torch.no_grad():
        q, v = iql.q(data.state[:2], data.action[:2]), iql.value(data.state[:1]).item()
    assert torch.allclose(q, torch.tensor([1.0, 0.0]), atol=0.05), q
    # V's 0.7-expectile of Q in {0, 1}, equally often: 0.7 (1 - v) = 0.3 v, v = 0.7. The lower one would be 0.3, the mean 0.5.
    assert abs(v - 0.7) < 0.1, v


def test_the_offline_advantage_is_q_of_the_executed_action_less_v_of_its_state_normalised():
    """The direction of every offline PPO step (chain_ppo_loss raises the likelihood of a chain with a positive one).
    Fitted IQL critics on two states: at s0 action +1 solves the task and -1 fails, at s1 both solve. By hand:
    Q(s0, +1) = 1, Q(s0, -1) = 0, V(s0) = 0.7 (the 0.7-expectile of {0, 1}), Q(s1, +-1) = 1 = V(s1): A = [0.3, -0.7, 0, 0],
    mean -0.1, std 0.424: [0.94, -1.41, 0.24, 0.24]. V - Q gives [-0.94, 1.41, -0.24, -0.24]; Q alone [0.5, -1.5, 0.5, 0.5]."""
    n = 64
    s0, s1 = torch.zeros(n, 3), torch.ones(n, 3)
    action = torch.tensor([[1.0], [-1.0]]).repeat(n, 1)
    state = torch.cat([s0, s1])
    reward = torch.cat([(action[:n, 0] > 0).float(), torch.ones(n)])
    data = Transitions(state, action, reward, torch.full((2 * n,), 0.9), state.clone(), torch.ones(2 * n),
                       torch.ones(2 * n, dtype=torch.bool))
    torch.manual_seed(0)
    iql = IQL(3, 1, expectile=0.7, hidden=(32, 32))
    iql.fit(data, steps=1000, batch_size=64, gen=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adv = offline_advantage(iql, torch.cat([s0[:2], s1[:2]]), action[:4])
    torch.testing.assert_close(adv, torch.tensor([0.943, -1.414, 0.236, 0.236]), rtol=0, atol=0.1)  # 0.03 off here


def test_iql_target_critics_move_tau_of_the_way_to_the_trained_ones_each_step():
    data = _one_state_two_actions()
    torch.manual_seed(0)
    iql = IQL(3, 1, tau=0.25, hidden=(32, 32))
    before = [p.clone() for p in iql.target.parameters()]
    iql.fit(data, steps=1, batch_size=64, gen=torch.Generator().manual_seed(0))
    trained = list(torch.nn.ModuleList([iql.q1, iql.q2]).parameters())
    assert any((now != start).any() for now, start in zip(trained, before))
    for target, start, now in zip(iql.target.parameters(), before, trained):
        torch.testing.assert_close(target - start, 0.25 * (now - start), rtol=1e-3, atol=1e-8)


def test_fqe_discounts_each_transition_by_its_own_span():
    """Two states: s0 -> s1 unrewarded, then s1 solves the task (reward 1, done); both transitions' discount is 0.5 (an
    episode's shortened last chunk has its own gamma ** steps). Q^pi(s0) = 0.5: a discount that is not the transition's
    own gives another value, and so does a bootstrap past the end (Q(s1) = 1 + 0.5 Q(s1): 2, and Q(s0) 1)."""
    chain = DenoisingChain(_policy(), steps=4)
    n = 64
    s0, s1 = torch.zeros(n, 18), torch.ones(n, 18)
    state = torch.cat([s0, s1])
    action = greedy_actions(chain, state, seed=123)  # the policy's own actions, from many noises
    data = Transitions(state, action, torch.cat([torch.zeros(n), torch.ones(n)]), torch.full((2 * n,), 0.5), torch.cat([s1, s1]),
                       torch.cat([torch.zeros(n), torch.ones(n)]), torch.cat([torch.ones(n), torch.zeros(n)]).bool())
    value = fqe(chain, data, s0[:8], steps=400, batch_size=64, seed=0)
    assert abs(value - 0.5) < 0.05, value


def test_dynamics_members_learn_the_state_change_and_a_step_adds_it_to_the_state():
    """AM-Q rolls the policy out through the ensemble's steps: a member predicts s' - s, which the step must add to s
    (a next state of the change alone puts every rollout near the origin, wherever it started)."""
    gen = torch.Generator().manual_seed(0)
    state, action = torch.rand(256, 4, generator=gen) * 2 - 1, torch.rand(256, 2, generator=gen) * 2 - 1
    next_state = state + 0.3 * action.repeat(1, 2)
    data = Transitions(state, action, torch.zeros(256), torch.full((256,), 0.9), next_state, torch.zeros(256),
                       torch.zeros(256, dtype=torch.bool))
    torch.manual_seed(0)
    dynamics = DynamicsEnsemble(4, 2, members=2, hidden=(64, 64))
    dynamics.fit(data, steps=300, batch_size=64, gen=torch.Generator().manual_seed(0))
    predicted, done, _ = dynamics.step(state[:32], action[:32], torch.Generator().manual_seed(1))
    error = (predicted - next_state[:32]).abs().max().item()
    assert error < 0.2 and not done.any(), error  # 0.06 here; the change alone is off by |s|, up to 1
