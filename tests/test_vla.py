"""The small VLA: a real frozen sentence encoder, multi-task training from the CLI, evaluation per
task, and use as an RPD teacher."""

import json

import torch

from robodistill.envs import EnvConfig, make_env
from robodistill.policies import load_policy
from robodistill.policies.teachers import load_teacher
from robodistill.policies.vla.instructions import phrasings
from robodistill.policies.vla.text import TextEncoder


def test_sentence_encoder_is_the_real_pretrained_one():
    text = TextEncoder()
    push, pick, lift = (text(phrasings(t)) for t in ("PushCube-v1", "PickCube-v1", "LiftPegUpright-v1"))
    assert push.shape == (3, 384) and torch.allclose(push.norm(dim=1), torch.ones(3), atol=1e-5)
    assert len({tuple(v.tolist()) for v in torch.cat([push, pick, lift])}) == 9  # every phrasing its own vector
    # Meaning, not spelling: a paraphrase is nearer than a sentence about something else.
    a, b, c = text(["push the cube to the goal", "shove the block onto the target", "stand the peg upright"])
    assert a @ b > a @ c + 0.1, (a @ b, a @ c)
    assert torch.equal(text(["stand the peg upright"])[0], c)  # cached: the same vector again


def test_train_vla_on_two_tasks_evaluates_each_resumes_and_teaches(cli, tmp_path, pickcube_rgb_demos):
    # PickCube demos from the shared fixture (48px, pd_ee_delta_pos); PushCube's are made by the command.
    datasets = tmp_path / "datasets"
    (datasets / "PickCube-v1").mkdir(parents=True)
    for suffix in (".h5", ".json"):
        src = pickcube_rgb_demos["path"].replace(".h5", suffix)
        (datasets / "PickCube-v1" / f"mp_n2_seed0.rgb.pd_ee_delta_pos{suffix}").symlink_to(src)
    common = ["tasks=[PushCube-v1,PickCube-v1]", "demos=2", f"datasets={datasets}", "workers=1", "image_size=48",
              "control_mode=pd_ee_delta_pos", "max_episode_steps=20", "batch_size=8", "policy.mlp_hidden=[64,64]",
              "eval_episodes=1", "checkpoint_every=10", f"hydra.run.dir={tmp_path / 'run'}"]
    r = cli("train-vla", "iterations=10", "eval_every=10", *common)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (datasets / "PushCube-v1" / "mp_n2_seed0.rgb.pd_ee_delta_pos.h5").is_file()
    assert "| PushCube-v1 |" in r.stdout and "| PickCube-v1 |" in r.stdout
    (row,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert set(row["tasks"]) == {"PushCube-v1", "PickCube-v1"} and 0 <= row["mean_success_once"] <= 1

    again = cli("train-vla", "iterations=12", "eval_every=0", "eval_episodes=0", *common[:-2],
                f"resume_from={tmp_path / 'run'}", "checkpoint_every=10", f"hydra.run.dir={tmp_path / 'run2'}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "at iteration 10" in again.stdout and "trained 12 iterations" in again.stdout

    ckpt = str(tmp_path / "run" / "checkpoints" / "last.pt")
    env_cfg = EnvConfig(task="PushCube-v1", obs_mode="rgb", control_mode="pd_ee_delta_pos", image_size=48)
    with make_env(env_cfg) as env:
        obs = env.reset(seed=0)
        history = {k: torch.stack([v, v], dim=1) for k, v in obs.items()}
        vla = load_policy(ckpt, env)
        assert vla.prompt == phrasings("PushCube-v1")[0]  # the env's task, told by the loader

        def act(**extra):
            vla.generator = torch.Generator().manual_seed(0)
            return vla.predict_chunk({**history, **extra})

        # The instruction steers the action: the same observation and noise, another task's words.
        assert not torch.allclose(act(), act(prompt=phrasings("PickCube-v1")[0]))
        # An instruction it never saw goes through the sentence encoder rather than failing.
        assert act(prompt="nudge the little box toward the mark").shape == act().shape
        # As RPD takes it: a teacher of one action per observation history.
        teacher = load_teacher(ckpt, env)
        assert teacher.act(history).shape == (1, env.single_action_space.shape[0])

    bad = cli("eval", f"policy={ckpt}", "env=PullCube-v1", "env.obs_mode=rgb", "env.control_mode=pd_ee_delta_pos", "env.image_size=48")
    assert bad.returncode == 2 and "trained on PushCube-v1, PickCube-v1, not PullCube-v1" in bad.stderr
    unknown = cli("train-vla", "tasks=[OpenCabinetDrawer-v1]", f"datasets={datasets}")
    assert unknown.returncode == 2 and "no instructions for OpenCabinetDrawer-v1" in unknown.stderr
