"""Data-parallel training: `launcher=torchrun nproc=2` (gloo, one thread per rank) for the teacher,
the consistency head and the PPO student."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from stable_baselines3 import PPO


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_ranks_stay_identical_and_learn_like_one_process(cli, tmp_path, pushcube_demos):
    common = ["env=PushCube-v1", f"dataset={pushcube_demos}", "iterations=30", "batch_size=32", "eval_every=15",
              "eval_episodes=0", "val_fraction=0.34", "policy.mlp_hidden=[64,64]", "checkpoint_every=15"]
    ddp = cli("train-teacher", "launcher=torchrun", "nproc=2", *common, f"hydra.run.dir={tmp_path / 'ddp'}")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ("2 ranks (each updating its shard of the parameters, gradients and parameters exchanged over shared memory); "
            "replicas identical at the end: True") in ddp.stdout
    assert ddp.stdout.count("trained 30 iterations") == 1  # rank 0 alone reports, logs and saves
    one = cli("train-teacher", *common, f"hydra.run.dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-3000:]
    # The same global batches (each rank its half), so the validation loss follows the same curve.
    for a, b in zip(_rows(tmp_path / "ddp"), _rows(tmp_path / "one"), strict=True):
        assert a["step"] == b["step"] and abs(a["val_loss"] - b["val_loss"]) < 0.1 * b["val_loss"], (a, b)

    # Each rank stepped the optimizer and EMA for its shard only; the checkpoint holds them whole, as one process
    # writes them, so a run continues on any number of ranks.
    shards, whole = (torch.load(tmp_path / run / "checkpoints" / "last.pt", weights_only=False) for run in ("ddp", "one"))
    layout = lambda state: ({i: {k: v.shape for k, v in s.items()} for i, s in state["optimizer"]["state"].items()},  # noqa: E731
                            [t.shape for t in state["ema_state"]["shadow_params"]], state["ema_state"]["optimization_step"])
    assert layout(shards) == layout(whole) and len(whole["optimizer"]["state"]) == len(whole["ema_state"]["shadow_params"])
    later = cli("train-teacher", "launcher=torchrun", "nproc=2", *common[:2], "iterations=45", *common[3:],
                f"resume_from={tmp_path / 'one'}", f"hydra.run.dir={tmp_path / 'later'}")
    assert later.returncode == 0 and "resumed from" in later.stdout and "at iteration 30" in later.stdout, later.stderr[-3000:]
    continued = torch.load(tmp_path / "later" / "checkpoints" / "last.pt", weights_only=False)
    assert {int(s["step"]) for s in continued["optimizer"]["state"].values()} == {45}  # Adam's moments carried on from 30
    assert continued["ema_state"]["optimization_step"] == 45

    # The consistency head of that teacher, on the same two ranks.
    head = cli("distill", "launcher=torchrun", "nproc=2", f"teacher={tmp_path / 'ddp' / 'checkpoints' / 'last.pt'}",
               "iterations=10", "batch_size=16", "eval_episodes=0", f"hydra.run.dir={tmp_path / 'head'}")
    assert head.returncode == 0, head.stderr[-3000:]
    assert "2 ranks (DDP, gradients averaged over shared memory); replicas identical at the end: True" in head.stdout
    assert head.stdout.count("distilled 10 iterations") == 1
    assert json.loads((tmp_path / "head" / "result.json").read_text())["ranks"] == 2


def test_ranks_stop_together_when_the_time_budget_runs_out(cli, tmp_path, pushcube_demos):
    # Rank 0's clock skips its evaluations, rank 1's counts the wait for them: a rank that left the loop on its
    # own clock left rank 0 waiting for its gradients until gloo's 30-minute timeout.
    r = cli("train-teacher", "launcher=torchrun", "nproc=2", "env=PushCube-v1", f"dataset={pushcube_demos}",
            "minutes=0.1", "iterations=1000000", "batch_size=32", "eval_every=50", "eval_episodes=1",
            "checkpoint_every=1000000", "policy.mlp_hidden=[64,64]", f"hydra.run.dir={tmp_path}", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _rows(tmp_path)
    assert len(rows) >= 3 and 6 <= rows[-1]["train_seconds"] < 7, rows  # evaluated on the way, stopped by the budget
    assert "replicas identical at the end: True" in r.stdout


def test_ppo_student_on_two_ranks_counts_global_steps_and_resumes_on_one(cli, tmp_path):
    common = ["env.num_envs=1", "n_steps=100", "batch_size=50", "n_epochs=2", "hidden=[32,32]", "obs_norm_steps=100",
              "eval_episodes=2", "eval_every=400", "checkpoint_every=400", "progress=false", "name=pair"]
    ddp = cli("rpd", "launcher=torchrun", "nproc=2", "total_steps=400", *common)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "2 ranks (DDP, gradients averaged over shared memory); replicas identical at the end: True" in ddp.stdout
    (run,) = (tmp_path / "runs" / "rpd").glob("*-pair")  # one directory for both ranks, under the run's name
    # 2 ranks x 1 env x 2 rollouts of 100 steps: 400 env steps in all, counted once, by rank 0.
    assert [h["step"] for h in json.loads((run / "history.json").read_text())] == [0, 400]
    assert PPO.load(run / "student.zip").num_timesteps == 200  # SB3's own count: one rank's steps
    # TensorBoard counts them alike: SB3's scalars (fps, losses) and the evaluations, at env steps of both ranks
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (tb,) = (run / "tb").iterdir()
    events = EventAccumulator(str(tb))
    events.Reload()
    assert [[e.step for e in events.Scalars(tag)] for tag in ("time/fps", "eval/success_once")] == [[200, 400], [0, 400]]
    # One process takes over the run, found by its name: it continues from the global count, not from one rank's.
    one = cli("rpd", "total_steps=600", "resume=true", *common)
    assert one.returncode == 0, one.stderr[-3000:]
    assert f"{run.name}/checkpoints/last.zip at step 400" in one.stdout
    resumed = max((tmp_path / "runs" / "rpd").glob("*-pair"))
    assert [h["step"] for h in json.loads((resumed / "history.json").read_text())] == [0, 400, 600]


def test_launcher_bad_input_is_one_clear_line(cli, cli_here, pushcube_demos):
    # Found on the ranks, under torchrun: one line, not torchrun's traceback.
    r = cli("train-teacher", "launcher=torchrun", "nproc=2", "batch_size=33", f"dataset={pushcube_demos}")
    assert r.returncode != 0 and "must divide evenly over nproc=2" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr.split("error:")[-1]
    for args, message in {  # found before any rank starts
        ("train-teacher", "launcher=slurm"): "launcher=slurm: the launcher is torchrun",
        ("eval", "launcher=torchrun", "policy=random"): "launcher=torchrun runs train-teacher, distill, rpd",
        ("train-teacher", "launcher=torchrun", "nproc=two"): "nproc=two must be a whole number",
        ("distill", "nproc=2"): "nproc= is the number of ranks of launcher=torchrun: add launcher=torchrun",  # hydra: +nproc=2
        ("eval", "nproc=2"): "(which runs train-teacher, distill, rpd; `eval` trains in one process)",
        ("distill", "-m", "seed=0,1", "launcher=torchrun"): "launcher=torchrun runs one run, not a sweep (-m)",
    }.items():
        r = cli_here(*args)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr[-2000:])


def test_the_launcher_says_each_error_of_the_ranks_once_when_their_lines_interleave(capsys):
    from robodistill.launcher import _relay

    # two ranks failing alike write their lines at once: "error: Xerror: X" then the newlines (seen with nproc=2)
    rank_writes = "import os, sys; [os.write(2, w) for w in (b'error: bad batch', b'error: bad batch', b'\\n\\n')]; sys.exit(1)"
    assert _relay([sys.executable, "-c", rank_writes]) == 2
    assert capsys.readouterr().err == "error: bad batch\n"


def test_shared_memory_mean_matches_gloo_on_three_ranks(tmp_path):
    """The shared-memory average (growing its buffer, then reusing it; gloo where /dev/shm is full)
    against gloo's all-reduce of the same tensors, on 3 ranks: equal up to rounding, bit-identical on
    every rank, no files left."""
    script = tmp_path / "mean.py"
    script.write_text(textwrap.dedent(f"""
        import os, torch, torch.distributed as dist
        from robodistill.training.distributed import finish, mean_, setup
        ranks, _ = setup("cpu")
        gen = torch.Generator().manual_seed(ranks.rank)
        out = []
        def check(n):
            t = torch.randn(n, generator=gen)
            ref = t.clone()
            dist.all_reduce(ref)
            out.append((mean_(t, ranks).clone(), ref / ranks.world))
        for n in (7, 1000, 300_000, 5, 300_000):
            check(n)
        slot_bytes = ranks.shared.slot_bytes
        asked = []
        def full(path):  # /dev/shm full: no room for more
            asked.append(path)
            return os.statvfs_result((4096,) + (0,) * 9)
        os.statvfs = full
        check(600_000)  # so gloo averages it
        check(600_000)  # and the refused size is not asked again
        torch.save({{"exchange": ranks.exchange, "out": out, "grown": ranks.shared.slot_bytes != slot_bytes, "asked": len(asked)}},
                   "{tmp_path}/rank%d.pt" % ranks.rank)
        finish(ranks)
    """))
    def ours():  # the buffers' files (not other processes', e.g. multiprocessing's semaphores of a test beside this one)
        return {f for f in os.listdir("/dev/shm") if f.startswith("robodistill-")}

    before = ours()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3", str(script)],
                       capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    results = [torch.load(tmp_path / f"rank{k}.pt") for k in range(3)]
    assert {res["exchange"] for res in results} == {"shared memory"} and not any(res["grown"] for res in results)
    assert results[0]["asked"] == 1  # rank 0 checks the room; a size once refused is not checked again
    for k, (mean, ref) in enumerate(results[0]["out"]):
        assert torch.allclose(mean, ref, atol=1e-6), k
        assert all(torch.equal(mean, res["out"][k][0]) for res in results[1:]), k
    assert ours() <= before


def test_replicas_shards_train_like_ddp_and_save_whole_state(tmp_path):
    """`Replicas` on 2 ranks: its shards (shared memory) and DDP (gloo: the path for ranks on other hosts) bring a
    module to the same parameters; `full` gives rank 0 the optimizer and EMA state one process would hold, and
    `local` cuts that back to exactly each rank's own."""
    script = tmp_path / "replicas.py"
    script.write_text(textwrap.dedent(f"""
        import dataclasses, torch, torch.distributed as dist
        from diffusers.training_utils import EMAModel
        from robodistill.training.distributed import Replicas, finish, setup
        ranks, _ = setup("cpu")
        out = {{}}
        for mode in ("shards", "ddp"):
            torch.manual_seed(0)
            net = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
            replicas = Replicas(net, ranks if mode == "shards" else dataclasses.replace(ranks, shared=None))
            optimizer, ema = torch.optim.AdamW(replicas.owned, lr=1e-2), EMAModel(replicas.owned, foreach=True)
            gen = torch.Generator().manual_seed(ranks.rank)
            for _ in range(5):
                loss = replicas.model(torch.randn(8, 5, generator=gen)).pow(2).mean()
                replicas.zero_grad()
                loss.backward()
                replicas.reduce_gradients()
                optimizer.step()
                ema.step(replicas.owned)
                replicas.gather_parameters()
            whole_optimizer, whole_ema = replicas.full(optimizer, ema)
            if ranks.main:
                torch.save({{"optimizer": whole_optimizer.state_dict(), "ema_state": whole_ema.state_dict()}}, "{tmp_path}/whole.pt")
            dist.barrier()
            cut = replicas.local(torch.load("{tmp_path}/whole.pt", weights_only=False))
            out[mode] = {{"sharded": replicas.sharded, "owned": len(replicas.owned), "params": [p.detach().clone() for p in net.parameters()],
                         "whole": torch.load("{tmp_path}/whole.pt", weights_only=False), "cut": cut,
                         "own": {{"optimizer": optimizer.state_dict(), "ema_state": ema.state_dict()}}}}
            del replicas
        torch.save(out, "{tmp_path}/rank%d.pt" % ranks.rank)
        finish(ranks)
    """))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
                       capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{k}.pt", weights_only=False) for k in range(2))
    shards, ddp = rank0["shards"], rank0["ddp"]
    assert shards["sharded"] and not ddp["sharded"] and shards["owned"] + rank1["shards"]["owned"] == ddp["owned"] == 6
    for a, b, c in zip(shards["params"], rank1["shards"]["params"], ddp["params"], strict=True):
        assert torch.equal(a, b) and torch.allclose(a, c, atol=1e-6)

    def flat(state):  # every tensor of an optimizer + EMA state, in parameter order
        opt = state["optimizer"]["state"]
        return [t for i in sorted(opt) for t in opt[i].values()] + list(state["ema_state"]["shadow_params"])

    for a, b in zip(flat(shards["whole"]), flat(ddp["whole"]), strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    for rank in (rank0, rank1):
        assert all(torch.equal(a, b) for a, b in zip(flat(rank["shards"]["cut"]), flat(rank["shards"]["own"]), strict=True))
        cut, own = rank["shards"]["cut"]["optimizer"], rank["shards"]["own"]["optimizer"]
        assert cut["param_groups"] == own["param_groups"] and sorted(cut["state"]) == sorted(own["state"])
