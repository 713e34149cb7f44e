"""The small VLA: a real frozen sentence encoder, multi-task training from the CLI, evaluation per
task, use as an RPD teacher in process and served over the openpi protocol with a text prompt."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from openpi_client.websocket_client_policy import WebsocketClientPolicy

from robodistill import checkpoints
from robodistill.deploy.controller import ChunkAgent, ControllerConfig
from robodistill.deploy.export import ExportConfig, export
from robodistill.deploy.server import PolicyServer
from robodistill.envs import EnvConfig, make_env
from robodistill.evaluation import HELD_OUT_SEEDS
from robodistill.policies import load_policy
from robodistill.policies.bundle import Bundle, ObservationError
from robodistill.policies.teachers import load_teacher
from robodistill.policies.vla.instructions import phrasings
from robodistill.policies.vla.text import TextEncoder
from tests.conftest import relabeled_demos, run_cli

PICK = EnvConfig(task="PickCube-v1", obs_mode="rgb", control_mode="pd_ee_delta_pos", image_size=48)


def test_sentence_encoder_is_the_real_pretrained_one(monkeypatch):
    text = TextEncoder()
    push, pick, lift = (text(phrasings(t)) for t in ("PushCube-v1", "PickCube-v1", "LiftPegUpright-v1"))
    assert push.shape == (3, 384) and torch.allclose(push.norm(dim=1), torch.ones(3), atol=1e-5)
    assert len({tuple(v.tolist()) for v in torch.cat([push, pick, lift])}) == 9  # every phrasing its own vector
    # Meaning, not spelling: a paraphrase is nearer than a sentence about something else.
    a, b, c = text(["push the cube to the goal", "shove the block onto the target", "stand the peg upright"])
    assert a @ b > a @ c + 0.1, (a @ b, a @ c)
    assert torch.equal(text(["stand the peg upright"])[0], c)  # cached: the same vector again
    monkeypatch.setattr("robodistill.policies.vla.text.CACHED", 4)  # a server meets endless prompts: the cache is bounded
    text(["a new prompt", "another one"])
    assert len(text._cache) == 4 and "stand the peg upright" in text._cache  # the least recently used went first


@pytest.fixture(scope="module")
def vla_run(tmp_path_factory, pickcube_rgb_demos):
    """`robodistill train-vla` on two tasks: PickCube demos from the shared fixture (48px,
    pd_ee_delta_pos), PushCube's made by the command itself."""
    root = tmp_path_factory.mktemp("vla")
    (root / "datasets" / "PickCube-v1").mkdir(parents=True)
    for suffix in (".h5", ".json"):
        src = pickcube_rgb_demos["path"].replace(".h5", suffix)
        (root / "datasets" / "PickCube-v1" / f"mp_n2_seed0.rgb.pd_ee_delta_pos{suffix}").symlink_to(src)
    common = ["tasks=[PushCube-v1,PickCube-v1]", "demos=2", "datasets=datasets", "workers=1", "image_size=48",
              "control_mode=pd_ee_delta_pos", "max_episode_steps=20", "batch_size=8", "policy.mlp_hidden=[64,64]",
              "policy.pred_horizon=8", "policy.act_horizon=4", "checkpoint_every=10"]
    r = run_cli("train-vla", "iterations=10", "eval_every=10", "eval_episodes=1", *common, f"hydra.run.dir={root / 'run'}", cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    return {"root": root, "common": common, "stdout": r.stdout, "ckpt": root / "run" / "checkpoints" / "last.pt"}


def test_train_vla_refuses_demos_that_start_where_it_rates(cli_here, pickcube_rgb_demos, tmp_path):
    # demos planned from seed 10000 (demo_seed=10000, or `robodistill demos seed=10000` renamed): its evaluations' states
    relabeled_demos(Path(pickcube_rgb_demos["path"]), tmp_path / "datasets" / "PickCube-v1", HELD_OUT_SEEDS,
                    name="mp_n2_seed0.rgb.pd_ee_delta_pos.h5")
    r = cli_here("train-vla", "tasks=[PickCube-v1]", "demos=2", "datasets=datasets", "image_size=48", "control_mode=pd_ee_delta_pos",
                 "max_episode_steps=20", "eval_episodes=1", "iterations=1", "policy.mlp_hidden=[64,64]")
    assert r.returncode == 2 and ("mp_n2_seed0.rgb.pd_ee_delta_pos.h5: 1 of its episodes start from seeds that this run's "
                                  "evaluations rate (10000 to 10000): 10000") in r.stderr, r.stderr[-2000:]
    assert not list(tmp_path.glob("runs/train-vla/*/checkpoints"))


def test_train_vla_of_one_task_ends_with_an_eval_command_that_names_it(cli_here, pickcube_rgb_demos, tmp_path):
    # it printed env=<PickCube-v1>, the angle brackets of a choice among several tasks around the one there is
    (tmp_path / "datasets" / "PickCube-v1").mkdir(parents=True)
    for suffix in (".h5", ".json"):
        (tmp_path / "datasets" / "PickCube-v1" / f"mp_n2_seed0.rgb.pd_ee_delta_pos{suffix}").symlink_to(
            pickcube_rgb_demos["path"].replace(".h5", suffix))
    r = cli_here("train-vla", "tasks=[PickCube-v1]", "demos=2", "datasets=datasets", "image_size=48", "control_mode=pd_ee_delta_pos",
                 "max_episode_steps=20", "eval_episodes=0", "iterations=1", "batch_size=8", "policy.mlp_hidden=[64,64]",
                 f"hydra.run.dir={tmp_path / 'run'}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"(robodistill eval policy={tmp_path / 'run' / 'checkpoints' / 'last.pt'} env=PickCube-v1)" in r.stdout, r.stdout[-2000:]


def test_train_vla_makes_demos_evaluates_every_task_and_resumes(vla_run, cli, cli_here, tmp_path):
    root = vla_run["root"]
    assert (root / "datasets" / "PushCube-v1" / "mp_n2_seed0.rgb.pd_ee_delta_pos.h5").is_file()
    assert "| PushCube-v1 |" in vla_run["stdout"] and "| PickCube-v1 |" in vla_run["stdout"]
    (row,) = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    assert set(row["tasks"]) == {"PushCube-v1", "PickCube-v1"} and 0 <= row["mean_success_once"] <= 1
    from robodistill.curves import series

    assert set(series(root / "run", "vla")[1]) == {"vla PushCube-v1", "vla PickCube-v1"}  # a curve per task
    assert (root / "run" / "curves.png").stat().st_size > 10_000

    # Resumed without its tasks, camera size and episode limit: it goes on in the envs it trained in.
    envs = ("tasks=", "image_size=", "max_episode_steps=", "datasets=")
    again = cli("train-vla", "iterations=12", "eval_every=0", "eval_episodes=0", *[a for a in vla_run["common"] if not a.startswith(envs)],
                f"resume_from={root / 'run'}", f"hydra.run.dir={root / 'run2'}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "at iteration 10" in again.stdout and "trained 12 iterations" in again.stdout
    assert "as the resumed run was trained: tasks=[PushCube-v1,PickCube-v1] image_size=48 max_episode_steps=20" in again.stdout
    assert checkpoints.load(root / "run2" / "checkpoints" / "last.pt")["train"]["max_episode_steps"] == 20
    # A checkpoint it cannot go on from is refused before any demos are made (minutes per task).
    finished = cli_here("train-vla", "iterations=12", f"resume_from={root / 'run2'}")
    assert finished.returncode == 2 and "is at iteration 12: the run already trained iterations=12" in finished.stderr, finished.stderr
    checkpoints.save(tmp_path / "agv.pt", {"kind": "agv_trainer"})  # what agv-train's checkpoints say they are
    foreign = cli_here("train-vla", f"resume_from={tmp_path / 'agv.pt'}")
    assert foreign.returncode == 2 and "holds a 'agv_trainer' checkpoint, not a train-vla run's state" in foreign.stderr, foreign.stderr
    bad_mode = cli_here("train-vla", "control_mode=bogus")  # an env it cannot make is said before demos are made for it
    assert bad_mode.returncode == 2 and "control_mode 'bogus' is not valid" in bad_mode.stderr and "making" not in bad_mode.stdout, bad_mode.stdout
    assert "(control_mode). Valid:" in bad_mode.stderr  # train-vla's own flag, not eval's env.control_mode
    bad_size = cli_here("train-vla", "image_size=0")
    assert bad_size.returncode == 2 and "error: image_size must be >= 1" in bad_size.stderr, bad_size.stderr
    assert not (tmp_path / "datasets").exists()

    # One of its tasks is rated in the env it was trained in (camera, size, episode limit) without restating it,
    # with the command the run printed.
    assert f"(robodistill eval policy={vla_run['ckpt']} env=<PushCube-v1|PickCube-v1>)" in vla_run["stdout"], vla_run["stdout"]
    rated = cli("eval", f"policy={vla_run['ckpt']}", "env=PickCube-v1", "episodes=1")
    assert rated.returncode == 0, rated.stderr[-2000:]
    assert "as the policy was trained: env.obs_mode=rgb env.max_episode_steps=20 env.image_size=48" in rated.stdout, rated.stdout
    bad = cli_here("eval", f"policy={vla_run['ckpt']}", "env=PullCube-v1")  # not one of its tasks: said first, not the camera
    assert bad.returncode == 2 and "trained on PushCube-v1, PickCube-v1, not PullCube-v1" in bad.stderr, bad.stderr
    unknown = cli_here("train-vla", "tasks=[OpenCabinetDrawer-v1]")
    assert unknown.returncode == 2 and "no instructions for OpenCabinetDrawer-v1" in unknown.stderr


def test_train_vla_refuses_a_camera_too_small_for_its_cnn(tmp_path):
    # image_size=3 trained: the CNN pools any size, here a 2 px crop that cannot move, pooled from one position
    from robodistill.errors import UserError
    from robodistill.training.vla import TrainVLAConfig, train

    with pytest.raises(UserError, match=r"^image_size=3 is too small for the policy's camera CNN: use 10 or more"):
        train(TrainVLAConfig(image_size=3, datasets=str(tmp_path / "datasets")), tmp_path / "run")
    assert not (tmp_path / "datasets").exists()  # said before any demos are made


def test_train_vla_refuses_a_task_named_twice(tmp_path):
    # tasks=[PushCube-v1,PushCube-v1] made its demos, then ended in an IndexError traceback at the first batch
    from robodistill.errors import UserError
    from robodistill.training.vla import TrainVLAConfig, train

    with pytest.raises(UserError, match=r"^tasks= names PushCube-v1 more than once: name each task once"):
        train(TrainVLAConfig(tasks=["PushCube-v1", "PickCube-v1", "PushCube-v1"], demos=1, workers=1, iterations=1, eval_episodes=0,
                             datasets=str(tmp_path / "datasets")), tmp_path / "run")
    assert not (tmp_path / "datasets").exists()  # said before any demos are made


def test_train_vla_resume_goes_on_with_the_runs_own_settings_and_applies_the_ones_given(vla_run, cli, cli_here):
    root = vla_run["root"]
    # Only what changes: the run's demos (the folder it was given relative to where it ran, found from here), batch size, evaluations and network stay its own (the defaults' demos=20 and
    # datasets=datasets made 20 new demos per task); the learning rate given reaches the optimizer, where the
    # checkpoint's used to win while the config recorded the given one.
    again = cli("train-vla", "iterations=12", "lr=3e-4", "threads=1", f"resume_from={root / 'run'}", f"hydra.run.dir={root / 'run3'}",
                timeout=240)
    assert again.returncode == 0 and "at iteration 10" in again.stdout, again.stderr[-3000:]
    assert (f"as the resumed run was trained: tasks=[PushCube-v1,PickCube-v1] control_mode=pd_ee_delta_pos image_size=48 "
            f"max_episode_steps=20 demos=2 datasets={root / 'datasets'} batch_size=8 eval_every=10 eval_episodes=1 checkpoint_every=10 "
            "policy.pred_horizon=8 policy.act_horizon=4 policy.mlp_hidden=[64,64]") in again.stdout, again.stdout
    saved = checkpoints.load(root / "run3" / "checkpoints" / "last.pt")
    assert saved["step"] == 12 and saved["train"]["batch_size"] == 8 and saved["train"]["demos"] == 2
    assert saved["optimizer"]["param_groups"][0]["initial_lr"] == saved["lr_schedule"]["base_lrs"][0] == 3e-4
    other = cli_here("train-vla", "iterations=14", "policy.mlp_hidden=[32]", f"resume_from={root / 'run3'}")
    assert other.returncode == 2 and "policy.mlp_hidden=[32]: the resumed run's policy was built with policy.mlp_hidden=[64,64]" in other.stderr, other.stderr


def test_vla_follows_its_instruction_and_teaches_in_process_and_served(vla_run, tmp_path):
    ckpt = str(vla_run["ckpt"])
    with make_env(PICK) as env:
        obs = env.reset(seed=0)
        history = {k: torch.stack([v, v], dim=1) for k, v in obs.items()}
        vla = load_policy(ckpt, env)
        assert vla.prompt == phrasings("PickCube-v1")[0]  # the env's task, told by the loader

        def act(**extra):
            vla.generator = torch.Generator().manual_seed(0)
            return vla.predict_chunk({**history, **extra})

        # The instruction steers the action: the same observation and noise, another task's words.
        assert torch.equal(act(), act(prompt=phrasings("PickCube-v1")[0]))
        assert not torch.allclose(act(), act(prompt=phrasings("PushCube-v1")[0]))
        # An instruction it never saw goes through the sentence encoder rather than failing.
        assert act(prompt="lift the little box up to the mark").shape == act().shape
        # As RPD takes it: the actions it would execute from an observation history.
        teacher = load_teacher(ckpt, env)
        assert teacher.act(history).shape == (1, teacher.act_horizon, 4)

        # Exported for PickCube: the graph also takes the instruction; the server takes `prompt` text.
        out, meta = export(ExportConfig(ckpt=ckpt, task="PickCube-v1", sampler="ddim", steps=2), tmp_path / "bundle")
        assert meta["env"]["task"] == "PickCube-v1" and meta["observation"]["instruction"]["shape"] == [384]
        assert meta["prompt"]["default"] == phrasings("PickCube-v1")[0]
        bundle = Bundle.load(out)
        for obs, message in (({"prompt": "x" * 1001}, "1001 characters; an instruction has at most 1000"),
                             ({"prompt": "  "}, "observation\\['prompt'\\] is empty"),
                             ({"prompt": "lift it", "instruction": np.zeros(384, np.float32)}, "both 'prompt' .* and 'instruction'")):
            with pytest.raises(ObservationError, match=message):
                bundle.instruct(obs, batched=False)
        assert bundle._text is None  # a bundle used with its exported prompts never loads the sentence encoder
        server = PolicyServer(bundle, port=0).start()
        assert bundle._text is not None  # a server loads it at start: no client's first new prompt waits seconds for it
        try:
            row = {k: v[0].numpy() for k, v in history.items()}

            def served(**extra):  # a fresh connection: the server's noise sequence starts again
                return WebsocketClientPolicy("127.0.0.1", server.port).infer({**row, **extra})["actions"]

            default = served()
            assert default.shape == (4, 4)
            np.testing.assert_allclose(served(prompt=phrasings("PickCube-v1")[0]), default, atol=1e-6)
            # Against the same prompt's answer (bit-identical, each connection's noise restarting), not against a size of
            # the prompt's effect: that depends on the tiny model's training (5e-4 here, 5x the 1e-4 this asked for)
            assert not np.allclose(served(prompt=phrasings("PushCube-v1")[0]), default, atol=1e-6)
            assert served(prompt="lift the little box up to the mark").shape == (4, 4)
            remote = load_teacher(f"ws://127.0.0.1:{server.port}", env)
            assert remote.prompt == phrasings("PickCube-v1")[0]  # sent with every observation, as openpi clients do
            assert remote.act(history).shape == (1, 4, 4)  # the bundle's chunk_length
            # `robodistill control`'s agent: a robot's frames hold no instruction; the prompt goes as text.
            frame = {k: v[0, -1].numpy() for k, v in history.items()}
            for prompt, same in ((None, True), (phrasings("PushCube-v1")[0], False)):
                agent = ChunkAgent(WebsocketClientPolicy("127.0.0.1", server.port), meta, ControllerConfig(hz=0), prompt)
                agent.reset()
                assert "instruction" not in agent.keys
                assert np.allclose(agent.get_action(frame)["actions"], default[0], atol=1e-6) == same
        finally:
            server.stop()


def tiny_llava(path, action_dim: int) -> None:
    """An OpenVLA-style model in Hugging Face format, randomly initialised here (nothing downloaded):
    a Llava (CLIP vision tower + Llama) with its own word-level tokenizer and image processor, and
    OpenVLA's action statistics in config.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor, PreTrainedTokenizerFast)

    words = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "in:", "what", "action", "should", "the", "robot", "take", "to", "out:"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<image>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
                   image_token="<image>", num_additional_image_tokens=1).save_pretrained(path)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                       image_size=32, patch_size=8),
        text_config=LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=2, max_position_embeddings=256),
        image_token_index=4, vision_feature_layer=-1, vision_feature_select_strategy="default")
    config.norm_stats = {"maniskill": {"action": {"q01": [-0.5] * action_dim, "q99": [0.5] * action_dim,
                                                  "mask": [True] * (action_dim - 1) + [False]}}}
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(path)


def test_hugging_face_vla_from_local_disk_acts_as_openvla_does(tmp_path, cli_here):
    model_dir = tmp_path / "tiny-openvla"
    tiny_llava(model_dir, action_dim=4)
    with make_env(PICK) as env:
        history = {k: v[:, None] for k, v in env.reset(seed=0).items()}
        vla = load_policy(str(model_dir), env)
        assert vla.instruction == phrasings("PickCube-v1")[0]
        actions = vla.predict_chunk(history)
        assert actions.shape == (1, 1, 4) and torch.equal(actions, vla.predict_chunk(history))  # greedy decoding
        assert actions[..., :3].abs().max() <= 0.5  # unnormalised into [q01, q99]
        # OpenVLA's bins: the top ids of the vocabulary, the highest id the lowest bin; masked dims stay normalised.
        top = vla.vocab_size - 1
        low, high = vla.decode(torch.tensor([[top] * 4])), vla.decode(torch.tensor([[top - 254] * 4]))
        torch.testing.assert_close(low[0, :3], torch.full((3,), -0.5 + 0.5 / 255), atol=1e-4, rtol=0)
        torch.testing.assert_close(high[0, :3], torch.full((3,), 0.5 - 0.5 / 255), atol=1e-4, rtol=0)
        assert abs(low[0, 3] + 1 - 1 / 255) < 1e-4  # the gripper: the bin centre itself
        assert load_teacher(str(model_dir), env).act(history).shape == (1, 1, 4)  # one action per observation
    state_only = cli_here("eval", f"policy={model_dir}", "env=PickCube-v1", "episodes=1")
    assert state_only.returncode == 2 and "needs camera images (env.obs_mode=rgb)" in state_only.stderr
