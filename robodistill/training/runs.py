"""What every training command shares about its run: the device, the checkpoint to resume, and
(for the imitation trainers) what a checkpoint holds to continue exactly where it stopped."""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from pathlib import Path

import torch

from robodistill import checkpoints
from robodistill.envs import EnvConfig
from robodistill.errors import UserError
from robodistill.evaluation import TRAINED_FIELDS, take_env
from robodistill.policies.base import trained_env
from robodistill.summary import RUN_STAMP, jsonl_rows, named


def pick_device(name: str) -> torch.device:
    """`auto`: CUDA where there is one, else the CPU; otherwise the named torch device, which must be here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UserError(f"device={name}: robodistill trains on auto, cpu, cuda or cuda:<index>")
    if device.type == "cuda" and device.index is not None and torch.cuda.is_available() and device.index >= torch.cuda.device_count():
        raise UserError(f"device={name}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0 to "
                        f"cuda:{torch.cuda.device_count() - 1}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name}, but torch finds no CUDA device here (torch {torch.__version__}): use device=cpu, "
                        f"or device=auto to take a GPU where there is one")
    return device


def set_threads(threads: int, ranks: int = 1) -> None:
    """torch's CPU threads for this process: `threads` for all `ranks` together, at least one each."""
    if threads < 1:  # torch refuses 0 with a traceback; the per-rank floor below would read it as 1
        raise UserError(f"threads={threads} must be >= 1: the CPU threads of the run (all ranks together)")
    torch.set_num_threads(max(1, threads // ranks))


def absolute_paths(spec: str) -> str:
    """`spec`'s comma-separated paths, absolute where they exist, as a run records them: a later command that reads
    them from its checkpoint (distill's default dataset, resume=true) finds them from any directory, not only from
    the one the run was started in. One that does not exist is left as given, for the error that names it."""
    return ",".join(str(Path(p).resolve()) if Path(p).exists() else p for p in spec.split(","))


def check_budget(iterations: int, batch_size: int, minutes: float | None, checkpoint_every: int) -> None:
    """The imitation trainers' budget: a run that would train on nothing is an error, not an empty run."""
    if iterations < 1 or batch_size < 1:
        raise UserError(f"iterations={iterations} and batch_size={batch_size} must be >= 1")
    if checkpoint_every < 1:
        raise UserError(f"checkpoint_every={checkpoint_every} must be >= 1 (iterations between checkpoints)")
    if minutes is not None and minutes <= 0:
        raise UserError(f"minutes={minutes} must be > 0 (or null: no time limit)")


def check_optimizer(lr: float, warmup: int, weight_decay: float = 0.0) -> None:
    """The imitation trainers' AdamW and warm-up: torch refuses a negative lr or weight decay only in a traceback, and
    lr=0 or a negative warm-up would train on without learning, or on a schedule nobody asked for."""
    if lr <= 0:
        raise UserError(f"lr={lr} must be > 0 (the peak learning rate of the cosine schedule)")
    if warmup < 0:
        raise UserError(f"warmup={warmup} must be >= 0 (iterations of linear learning-rate warm-up)")
    if weight_decay < 0:
        raise UserError(f"weight_decay={weight_decay} must be >= 0 (AdamW's decoupled weight decay; 0: none)")


def check_ppo(**settings: float | None) -> None:
    """PPO's settings, by their fields' names (None: the default): torch refuses a negative learning rate only in a
    traceback, and a discount or GAE lambda outside [0, 1], a clip range, gradient norm or KL target not above 0, or no
    epochs trained on without complaint, on returns or updates nobody asked for."""
    for key, value in settings.items():
        if value is None:
            continue
        if key.startswith(("gamma", "gae_lambda")):
            if not 0 <= value <= 1:
                raise UserError(f"{key}={value} must be in [0, 1] ({'a discount' if key.startswith('gamma') else 'GAE lambda'})")
        elif key.endswith("epochs"):
            if value < 1:
                raise UserError(f"{key}={value} must be >= 1 (passes over each rollout)")
        elif not value > 0:
            raise UserError(f"{key}={value} must be > 0")


def check_eval_episodes(episodes: int, least: int = 0, every: int = 0) -> None:
    """`least`=0 where eval_episodes=0 turns evaluation off; 1 where the run always rates its final policy. `every`: the
    imitation trainers' eval_every, in iterations."""
    if episodes < least:
        why = "0 turns evaluation off" if least == 0 else "the run rates its final policy on them"
        raise UserError(f"eval_episodes={episodes} must be >= {least} ({why})")
    if every < 0:  # `step % every == 0` holds for a negative one as for its opposite: eval_every=-1 evaluated every iteration
        raise UserError(f"eval_every={every} must be >= 0 (iterations between evaluations; 0: only at the end)")


def budget_spent(step: int, budget: int, seconds: float = 0.0, minutes: float | None = None) -> bool:
    """Whether a run at `step` after `seconds` of training has trained its `budget` of steps or its `minutes`."""
    return step >= budget or (minutes is not None and seconds >= minutes * 60)


def check_unfinished(resume_path: Path, step: int, budget: int, field: str = "iterations", unit: str = "iteration", *,
                     seconds: float = 0.0, minutes: float | None = None) -> None:
    """Resuming a run that already trained its budget (`field`=, counted in `unit`s, or `minutes`= of training
    time, which add up across resumes) would make a new run directory with nothing new in it."""
    if not budget_spent(step, budget, seconds, minutes):
        return
    if step >= budget:
        raise UserError(f"{resume_path} is at {unit} {step}: the run already trained {field}={budget}; "
                        f"raise {field}= to train it further, or use that checkpoint as it is")
    raise UserError(f"{resume_path} has trained for {seconds / 60:.1f} min: the run already used minutes={minutes:g} "
                    f"(training time adds up across resumes); raise minutes=, or set minutes=null, to train it further")


def find_resume(resume: bool, resume_from: str | None, name: str, run_dir: Path, filename: str = "last.pt") -> Path | None:
    """The checkpoint a run continues from: `resume_from` (a run directory or a checkpoint file), or
    with `resume=true` the newest earlier run of the same command and `name` with checkpoints/<filename>."""
    if resume_from:
        path = Path(resume_from)
        path = path / "checkpoints" / filename if path.is_dir() else path
        if not path.is_file():
            raise UserError(f"resume_from={resume_from}: no checkpoint at {path}")
        return path
    if not resume:
        return None
    return latest_run(name, run_dir, f"checkpoints/{filename}") / "checkpoints" / filename


def latest_run(name: str, run_dir: Path, holding: str) -> Path:
    """`resume=true`: the newest earlier run of this command (beside `run_dir`, the new one) named `name`
    that holds `holding`; for a sweep's job (`-m`, <time>-multirun/<n>), job n of the newest earlier sweep, so that
    the same sweep again with resume=true continues each of its jobs."""
    if run_dir.name.isdigit() and re.fullmatch(RUN_STAMP + "multirun", run_dir.parent.name):
        sweeps = sorted(p / run_dir.name for p in run_dir.parent.parent.glob("*-multirun") if p != run_dir.parent)
        runs = [job for job in sweeps if (job / holding).is_file() and named(job, name)]
        if not runs:
            raise UserError(f"resume=true: no earlier sweep under {run_dir.parent.parent} has a job {run_dir.name} named '{name}' "
                            f"with {holding}: resume a sweep with the values it was started with")
        return runs[-1]
    pattern = re.compile(RUN_STAMP + re.escape(name.replace("/", "-")))  # as configs/common.yaml names run directories
    runs = sorted(p for p in run_dir.parent.glob("*") if pattern.fullmatch(p.name) and p != run_dir and (p / holding).is_file())
    if not runs:
        raise UserError(f"resume=true: no earlier run named '{name}' with {holding} under {run_dir.parent}")
    return runs[-1]


def carry_metrics(resume_path: Path | None, step: int, run_dir: Path) -> None:
    """A resumed run's metrics.jsonl begins with its earlier run's rows up to `step`, the checkpoint's (those
    after it were lost with the kill and come again), so its curves go back to the start."""
    old = resume_path.parent.parent / "metrics.jsonl" if resume_path is not None else None
    if old is None or not old.is_file():
        return
    kept = [row for row in jsonl_rows(old) if row["step"] <= step]
    checkpoints.write_atomic(run_dir / "metrics.jsonl", lambda f: f.write("".join(f"{json.dumps(row)}\n" for row in kept).encode()))


def tensorboard(run_dir: Path, step: int):
    """The run's TensorBoard writer (`run_dir`/tb) for a run that goes on from `step` (0: a new one). One resumed in the
    directory it was killed in (rl100 resumes its stages in place) had logged the steps after its checkpoint, and logs
    them again: TensorBoard hides the earlier ones from `step` + 1 on, which it would otherwise show twice."""
    from torch.utils.tensorboard import SummaryWriter  # here: tensorboard costs every command importing this module

    return SummaryWriter(str(run_dir / "tb"), purge_step=step + 1 if step else None)


def append_metrics(run_dir: Path, row: dict) -> None:
    """Append `row` to the run's metrics.jsonl, opened for it alone: a full disk ends the run in one line (the rows
    before it are kept; `jsonl_rows` skips the cut-short one), not in the traceback of a file left open."""
    path = run_dir / "metrics.jsonl"
    try:
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")
    except OSError as err:
        checkpoints.raise_if_no_room(err, path, "the rows before this one are kept")
        raise


def carry_best(resume_path: Path | None, step: int, run_dir: Path) -> None:
    """A resumed run's checkpoints/best.pt starts as its earlier run's, if that one was made by `step`: the resumed
    run saves best.pt only when it beats the best so far, so without it the best it reports would be in another
    run directory, and `eval policy=<this run>/checkpoints/best.pt` would say the run never evaluated."""
    old = resume_path.parent / "best.pt" if resume_path is not None else None
    if old is None or not old.is_file() or checkpoints.load(old)["step"] > step:  # a later one: the resumed run evaluates that step again
        return
    checkpoints.write_atomic(run_dir / "checkpoints" / "best.pt", lambda f: f.write(old.read_bytes()))


def resumed_env(env_cfg: EnvConfig, path: Path | None, given: set[str], recorded: dict | None = None) -> EnvConfig:
    """A resumed run goes on in the env it trained in: its task and TRAINED_FIELDS, as its checkpoint
    (`path`, None when not resuming) records them, where the command line (`given`) leaves them unset. `recorded`: that
    env, where the caller has read the checkpoint already."""
    if path is None:
        return env_cfg
    return take_env(env_cfg, trained_env(str(path)) if recorded is None else recorded, given, ("task", *TRAINED_FIELDS),
                    who="the resumed run")


def resumed_settings(cfg, trained: dict, fields: tuple[str, ...], given: set[str]) -> dict:
    """The `fields` (dotted for a nested config: `policy.mlp_hidden`) that the run a checkpoint continues was trained with
    (`trained`) and that the command line (`given`) leaves unset: a resumed run goes on with its own budget, data,
    optimizer and evaluations, not the defaults'. Those that differ from `cfg`'s are said, recorded in the run's config
    (so that resuming this run again keeps them) and returned, for the caller to set."""
    from robodistill.configs import record_taken

    taken = {k: trained[k] for k in fields if k in trained and k not in given and trained[k] != setting(cfg, k)}
    if taken and os.environ.get("RANK", "0") == "0":  # under torchrun every rank takes them; one says so
        print(f"as the resumed run was trained: {' '.join(f'{k}={command_line(v)}' for k, v in taken.items())} (set <field>= to change)")
    record_taken(taken)
    return taken


def resumed_trainer(cfg, state: dict, fields: tuple[str, ...], given: set[str], path: Path):
    """An imitation trainer's `cfg` (with a DiffusionConfig `policy`) as the run whose checkpoint `state` (at `path`) it
    continues: its `fields` and its policy's where `given` leaves them unset (see resumed_settings). The policy is its
    weights', so a `policy.<field>` given with another value is refused."""
    built = state["policy"]["config"]
    changed = [k for k in built if f"policy.{k}" in given and getattr(cfg.policy, k) != built[k]]
    if changed:
        raise UserError(f"{' '.join(f'policy.{k}={command_line(getattr(cfg.policy, k))}' for k in changed)}: the resumed run's policy "
                        f"was built with {' '.join(f'policy.{k}={command_line(built[k])}' for k in changed)} ({path}); drop "
                        f"{' '.join(f'policy.{k}=' for k in changed)} to continue it, or train a new policy without resume")
    trained = {**state["train"], **{f"policy.{k}": v for k, v in built.items()}}
    return with_fields(cfg, resumed_settings(cfg, trained, (*fields, *(f"policy.{k}" for k in built)), given))


def setting(cfg, key: str):
    """`cfg`'s field `key`, dotted for a nested config (`policy.mlp_hidden`)."""
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def with_fields(cfg, values: dict):
    """`cfg` (a dataclass) with `values`, keyed by field as resumed_settings returns them (dotted for a nested config)."""
    own, nested = {}, {}
    for key, value in values.items():
        group, dot, rest = key.partition(".")
        if dot:
            nested.setdefault(group, {})[rest] = value
        else:
            own[key] = value
    return replace(cfg, **own, **{group: with_fields(getattr(cfg, group), v) for group, v in nested.items()})


def command_line(value) -> str:
    """A config value as the command line writes it: a list as [a,b], which hydra reads back."""
    return f"[{','.join(map(str, value))}]" if isinstance(value, (list, tuple)) else str(value)


def schedule_note(step: int, iterations: int, warmup: int) -> str:
    """What a user should know when `minutes` stopped a run before `iterations`: how far its cosine
    learning-rate schedule (set over `iterations`, after `warmup`) had decayed. Empty when it ran to its end."""
    if step >= iterations:
        return ""
    from diffusers.optimization import get_scheduler  # here: diffusers costs every command importing this module 1.7 s

    # the trainers' own schedule (diffusers' "cosine"), read at `step` rather than written out again
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    factor = get_scheduler("cosine", probe, num_warmup_steps=warmup, num_training_steps=iterations).lr_lambdas[0](step)
    return (f"\nminutes= stopped the run at {step / iterations:.0%} of iterations={iterations}, its cosine learning rate still at "
            f"{factor:.0%} of its peak; iterations={step} ends the schedule in this time")


def ema_weights(ema, policy: torch.nn.Module) -> dict:
    """The policy's state dict with the EMA's parameters in place of the trained ones."""
    ema.store(policy.parameters())
    ema.copy_to(policy.parameters())
    weights = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    ema.restore(policy.parameters())
    return weights


def training_state(policy: torch.nn.Module, optimizer, lr_schedule, ema, batch_gen: torch.Generator) -> dict:
    """The checkpoint fields an imitation run resumes from (besides its counters and config)."""
    return {"model": policy.state_dict(), "ema": ema_weights(ema, policy), "ema_state": ema.state_dict(),
            "optimizer": optimizer.state_dict(), "lr_schedule": lr_schedule.state_dict(), "rng": checkpoints.rng_state(),
            "batch_rng": batch_gen.get_state()}


def restore_training(state: dict, policy: torch.nn.Module, optimizer, lr_schedule, ema, batch_gen: torch.Generator) -> None:
    """Load what `training_state` saved: the next batches and random draws are the ones the killed run would have made.
    The learning rate, weight decay and EMA warm-up power stay those `optimizer`, `lr_schedule` and `ema` were built with."""
    policy.load_state_dict(state["model"])
    load_optimization(optimizer, lr_schedule, state["optimizer"], state["lr_schedule"])
    power = ema.power
    ema.load_state_dict(state["ema_state"])
    ema.power = power
    ema.to(device=next(policy.parameters()).device)  # its shadow weights are the checkpoint's tensors, read on the CPU
    checkpoints.set_rng_state(state["rng"])
    batch_gen.set_state(state["batch_rng"])


def load_optimization(optimizer, lr_schedule, optimizer_state: dict, schedule_state: dict) -> None:
    """Load a checkpoint's optimizer and learning-rate schedule states, keeping the peak learning rate and weight decay
    they were built with (the command line's, else the resumed run's own): the saved states' would silently win."""
    peaks, decays = list(lr_schedule.base_lrs), [group["weight_decay"] for group in optimizer.param_groups]
    optimizer.load_state_dict(optimizer_state)
    lr_schedule.load_state_dict(schedule_state)
    lr_schedule.base_lrs = peaks
    for group, peak, decay, factor in zip(optimizer.param_groups, peaks, decays, lr_schedule.lr_lambdas):
        group.update(initial_lr=peak, lr=peak * factor(lr_schedule.last_epoch), weight_decay=decay)
