"""Data-parallel teacher training: `launcher=torchrun nproc=2` (gloo, one thread per rank)."""

import json


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_ranks_stay_identical_and_learn_like_one_process(cli, tmp_path, pushcube_demos):
    common = ["env=PushCube-v1", f"dataset={pushcube_demos}", "iterations=30", "batch_size=32", "eval_every=15",
              "eval_episodes=0", "val_fraction=0.34", "policy.mlp_hidden=[64,64]", "checkpoint_every=15"]
    ddp = cli("train-teacher", "launcher=torchrun", "nproc=2", *common, f"hydra.run.dir={tmp_path / 'ddp'}")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "2 ranks (DDP); replicas identical at the end: True" in ddp.stdout
    assert ddp.stdout.count("trained 30 iterations") == 1  # rank 0 alone reports, logs and saves
    one = cli("train-teacher", *common, f"hydra.run.dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-3000:]
    # The same global batches (each rank its half), so the validation loss follows the same curve.
    for a, b in zip(_rows(tmp_path / "ddp"), _rows(tmp_path / "one"), strict=True):
        assert a["step"] == b["step"] and abs(a["val_loss"] - b["val_loss"]) < 0.1 * b["val_loss"], (a, b)


def test_launcher_bad_input_is_one_clear_line(cli, pushcube_demos):
    for args, message in {
        ("train-teacher", "launcher=torchrun", "nproc=2", "batch_size=33", f"dataset={pushcube_demos}"): "must divide evenly over nproc=2",
        ("train-teacher", "launcher=slurm"): "launcher=slurm: the launcher is torchrun",
        ("eval", "launcher=torchrun", "policy=random"): "launcher=torchrun runs train-teacher",
        ("train-teacher", "launcher=torchrun", "nproc=two"): "nproc=two must be a whole number",
    }.items():
        r = cli(*args)
        assert r.returncode != 0 and message in r.stderr, (args, r.stderr[-2000:])
        assert "Traceback" not in r.stderr.split("error:")[-1]
