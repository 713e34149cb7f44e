"""`robodistill train-teacher`: imitation training of the Diffusion Policy teacher.

Reads top to bottom: data -> model -> optimisation loop with EMA, periodic shared evaluation,
atomic checkpoints (last every `checkpoint_every`, best on evaluation) and resume.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from robodistill import checkpoints
from robodistill.curves import write_run_curves
from robodistill.data import Horizons, WindowDataset, fit_normalizers, load_episodes, sample_batches, split_episodes
from robodistill.data.trajectories import seeds_by_file
from robodistill.envs import EnvConfig, make_env, zero_action_holds_still
from robodistill.errors import UserError
from robodistill.evaluation import HELD_OUT_SEEDS, check_apart, evaluate, rated_seeds
from robodistill.policies.diffusion.config import DiffusionConfig
from robodistill.policies.diffusion.encoders import check_image_size
from robodistill.policies.diffusion.policy import KIND, DiffusionPolicy
from robodistill.training.distributed import Replicas, any_rank, describe, finish, finite_loss, replicas_identical, setup
from robodistill.training.runs import (absolute_paths, append_metrics, carry_best, carry_metrics, check_budget, check_eval_episodes, check_optimizer, check_unfinished, ema_weights, find_resume,
                                      restore_training, resumed_env, resumed_trainer, schedule_note, set_threads, tensorboard, training_state)


@dataclass
class TrainTeacherConfig:
    """`robodistill train-teacher` (configs/train-teacher.yaml)."""

    env: EnvConfig = field(default_factory=EnvConfig)
    policy: DiffusionConfig = field(default_factory=DiffusionConfig)
    dataset: str = ""  # trajectory .h5 path(s), comma-separated and quoted for hydra: dataset='a.h5,b.h5'
    num_demos: int | None = None  # use the first N episodes
    val_fraction: float = 0.1
    iterations: int = 30000
    minutes: float | None = None  # also stop after this much training time (evaluation excluded)
    batch_size: int = 64
    lr: float = 1e-3  # the MLP recipe; the U-Net recipe (diffusion_policy) uses 1e-4
    weight_decay: float = 1e-6
    warmup: int = 500
    ema_power: float = 0.75
    eval_every: int = 2000  # iterations; 0: only at the end
    eval_episodes: int = 20
    checkpoint_every: int = 1000
    threads: int = 2  # CPU threads, all ranks together (launcher=torchrun nproc=N: threads // N each)
    device: str = "auto"
    resume: bool = False  # continue from the newest checkpoints/last.pt of a run with this name
    resume_from: str | None = None  # or from this run directory / checkpoint file
    seed: int = 0
    name: str = "teacher"


def train(cfg: TrainTeacherConfig, run_dir: Path, saved: dict | None = None) -> dict:
    """Train into `run_dir`, or go on from the checkpoint `resume`/`resume_from` name: `saved` is that checkpoint
    (resumable's) where the caller has read it already (main, to take the run's settings from it)."""
    ranks, device = setup(cfg.device)
    set_threads(cfg.threads, ranks.world)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    run_dir.mkdir(parents=True, exist_ok=True)
    check_budget(cfg.iterations, cfg.batch_size, cfg.minutes, cfg.checkpoint_every)
    check_optimizer(cfg.lr, cfg.warmup, cfg.weight_decay)
    check_eval_episodes(cfg.eval_episodes, every=cfg.eval_every)
    if not 0 <= cfg.val_fraction < 1:  # split_episodes would clip it silently: no validation, or one training episode
        raise UserError(f"val_fraction={cfg.val_fraction} must be >= 0 and < 1 (the share of episodes held out for the validation loss)")
    if cfg.batch_size % ranks.world:
        raise UserError(f"batch_size={cfg.batch_size} (the global batch) must divide evenly over nproc={ranks.world} ranks")

    if cfg.env.obs_mode == "rgb":
        check_image_size(cfg.env.image_size, cfg.policy.crop, "env.image_size")

    # ---- data: episodes split by episode; normalizers fitted on the training split only
    if not cfg.dataset:
        raise UserError("dataset= is required: the .h5 written by `robodistill demos` (several: dataset='a.h5,b.h5', quoted)")
    cfg = replace(cfg, dataset=absolute_paths(cfg.dataset))
    episodes = load_episodes(cfg.dataset.split(","), control_mode=cfg.env.control_mode, obs_mode=cfg.env.obs_mode, task=cfg.env.task)
    if cfg.num_demos is not None and not 0 <= cfg.num_demos <= len(episodes):
        raise UserError(f"num_demos={cfg.num_demos}, but dataset={cfg.dataset} holds {len(episodes)} episodes: give 1 to "
                        f"{len(episodes)} (0 or unset: all), or make more with `robodistill demos n=`")
    episodes = episodes[: cfg.num_demos] if cfg.num_demos else episodes
    train_ids, val_ids = split_episodes(len(episodes), cfg.val_fraction, cfg.seed)
    train_eps, val_eps = [episodes[i] for i in train_ids], [episodes[i] for i in val_ids]
    check_apart(seeds_by_file(train_eps), rated_seeds(cfg.seed, cfg.eval_episodes))
    p = cfg.policy
    try:
        horizons = Horizons(p.obs_horizon, p.pred_horizon, p.act_horizon)
    except ValueError:
        raise UserError(f"policy.obs_horizon={p.obs_horizon}, policy.pred_horizon={p.pred_horizon}, policy.act_horizon={p.act_horizon}: "
                        f"a chunk holds the observed steps and the executed ones, so 1 <= act_horizon <= pred_horizon - "
                        f"obs_horizon + 1 = {p.pred_horizon - p.obs_horizon + 1}") from None
    rgb = train_eps[0].obs.get("rgb")
    if rgb is not None and rgb.shape[1:3] != (cfg.env.image_size, cfg.env.image_size):
        raise UserError(f"dataset={cfg.dataset} holds {rgb.shape[2]}x{rgb.shape[1]} px images, but env.image_size={cfg.env.image_size}: "
                        f"set env.image_size={rgb.shape[1]}, so the policy is evaluated and saved with the camera it learned from")
    delta = zero_action_holds_still(cfg.env.control_mode)
    train_ds = WindowDataset(train_eps, horizons, delta_actions=delta)
    val_ds = WindowDataset(val_eps, horizons, delta_actions=delta) if val_eps else None

    # ---- model: the evaluation env tells the action bounds and checks the dataset's observations
    env_cfg = cfg.env
    eval_env = make_env(env_cfg, ignore_terminations=True)
    low, high = eval_env.action_low.cpu(), eval_env.action_high.cpu()
    state_dim = eval_env.single_observation_space["state"].shape[0]
    if train_eps[0].obs["state"].shape[1] != state_dim:
        eval_env.close()  # rl100's imitation stage calls train() in its process: leave it no env behind
        raise UserError(f"dataset states have {train_eps[0].obs['state'].shape[1]} dims, the env {env_cfg.task} ({env_cfg.obs_mode}) gives {state_dim}: was it recorded for another task or obs_mode?")
    actions = np.concatenate([e.actions for e in train_eps])
    if actions.shape[1] != len(low):  # else it trains, then fails at its first evaluation, or saves a policy no env takes
        eval_env.close()
        raise UserError(f"dataset actions have {actions.shape[1]} dims, the env {env_cfg.task} ({env_cfg.control_mode}) takes {len(low)}: "
                        f"were they recorded with another control mode than its .json records ({env_cfg.control_mode})?")
    gripper_dims = [d for d in range(actions.shape[1]) if np.isin(actions[:, d], (-1.0, 1.0)).all()]
    policy = DiffusionPolicy(p, state_dim, actions.shape[1], low, high, rgb.shape[-1] if rgb is not None else None, gripper_dims)
    policy.load_normalizers(fit_normalizers(train_eps, p.normalizer))
    policy.to(device)
    # Under DDP: buffers (normalizer statistics, action bounds) are fixed and equal on every rank, so DDP's default
    # broadcast of them before each forward is a wasted collective (~7% of an MLP step on CPU).
    replicas = Replicas(policy, ranks, broadcast_buffers=False)
    model = replicas.model
    optimizer = torch.optim.AdamW(replicas.owned, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    lr_schedule = get_scheduler("cosine", optimizer, num_warmup_steps=cfg.warmup, num_training_steps=cfg.iterations)
    # Warm-up (decay grows as 1 - (1 + step)^-power up to 0.9999), as diffusion_policy does: a fixed
    # 0.9999 from step 0 would leave the EMA mostly at the random initial weights for 10k steps.
    ema = EMAModel(replicas.owned, decay=0.9999, use_ema_warmup=True, power=cfg.ema_power, foreach=True)
    step, best, train_seconds = 0, -1.0, 0.0
    batch_gen = torch.Generator().manual_seed(cfg.seed)

    # Built before any state is restored: building modules (and envs, above) draws from the global RNGs.
    ema_policy = DiffusionPolicy.from_spec(policy.spec()).to(device)

    resume_path = find_resume(cfg.resume, cfg.resume_from, cfg.name, run_dir)
    if resume_path is not None:
        state = saved if saved is not None else resumable(resume_path)
        if state["policy"] != policy.spec():  # its config was taken or refused (main): the data's dims or the gripper's differ
            saved, built = ({**spec["config"], **spec["dims"]} for spec in (state["policy"], policy.spec()))
            differ = [k for k in built if saved.get(k) != built[k]]
            raise UserError(f"{resume_path} holds a policy with {' '.join(f'{k}={saved.get(k)}' for k in differ)}, where dataset="
                            f"{cfg.dataset} in {cfg.env.task} ({cfg.env.obs_mode}, {cfg.env.control_mode}) makes "
                            f"{' '.join(f'{k}={built[k]}' for k in differ)}: resume with the run's own dataset= and env, or train a new "
                            "teacher without resume")
        restore_training(replicas.local(state), policy, optimizer, lr_schedule, ema, batch_gen)
        step, best, train_seconds = state["step"], state["best"], state["train_seconds"]
        check_unfinished(resume_path, step, cfg.iterations, seconds=train_seconds, minutes=cfg.minutes)
        print(f"resumed from {resume_path} at iteration {step}")

    def save(name: str, optimizer, ema) -> None:
        """`optimizer` and `ema`: `replicas.full`'s, over every parameter."""
        if not ranks.main:
            return
        checkpoints.save(run_dir / "checkpoints" / f"{name}.pt", {
            "kind": KIND, "policy": policy.spec(), "env": asdict(env_cfg), "train": asdict(cfg),
            "step": step, "best": best, "train_seconds": train_seconds,
            **training_state(policy, optimizer, lr_schedule, ema, batch_gen),
        })

    def run_eval(ema) -> dict:
        ema_policy.load_state_dict(ema_weights(ema, policy))
        ema_policy.eval()
        report = evaluate(ema_policy, eval_env, cfg.eval_episodes, seed=HELD_OUT_SEEDS + cfg.seed, progress=False)
        return report.summary

    @torch.no_grad()
    def val_loss() -> float | None:
        if val_ds is None:
            return None
        gen = torch.Generator().manual_seed(0)
        batch = next(sample_batches(val_ds, min(len(val_ds), 256), gen))
        policy.eval()
        # The same diffusion noise and timesteps at every evaluation (comparable losses), drawn aside from the
        # global RNG so that evaluating does not change what training draws next.
        with torch.random.fork_rng():
            torch.manual_seed(0)
            loss = policy.loss(_to(batch, device)).item()
        policy.train()
        return loss

    # ---- optimisation
    if ranks.world > 1:  # each rank its own diffusion noise and timesteps (weights stay identical)
        torch.manual_seed(cfg.seed * 1000 + 100 * ranks.rank + step)
    writer = tensorboard(run_dir, step) if ranks.main else None
    if ranks.main:
        carry_metrics(resume_path, step, run_dir)
        carry_best(resume_path, step, run_dir)
    batches = sample_batches(train_ds, cfg.batch_size, batch_gen, part=(ranks.rank, ranks.world))
    policy.train()
    bar = tqdm(total=cfg.iterations, initial=step, desc="train-teacher", unit="it", disable=not ranks.main)
    history: list[dict] = []
    tick = time.perf_counter()
    # Every rank leaves the loop on one shared decision, taken on rank 0's clock: it skips the time rank 0
    # spends evaluating and saving, which the other ranks' clocks count as waiting.
    last = step >= cfg.iterations or (cfg.minutes is not None and train_seconds >= cfg.minutes * 60)
    while not last:
        loss = model(_to(next(batches), device))
        replicas.zero_grad()
        loss.backward()
        replicas.reduce_gradients()
        optimizer.step()
        lr_schedule.step()
        ema.step(replicas.owned)
        replicas.gather_parameters()
        step += 1
        bar.update(1)
        now = time.perf_counter()
        train_seconds += now - tick
        tick = now
        out_of_time = ranks.main and cfg.minutes is not None and train_seconds >= cfg.minutes * 60
        last = step >= cfg.iterations or (cfg.minutes is not None and any_rank(out_of_time, ranks))
        evaluating, saving = (cfg.eval_every and step % cfg.eval_every == 0) or last, step % cfg.checkpoint_every == 0 or last
        if step % 50 == 0 or evaluating or saving:  # checked before weights that diverged are saved
            value = finite_loss(loss, step, cfg.lr, ranks)
            if step % 50 == 0 and ranks.main:
                bar.set_postfix(refresh=False, loss=f"{value:.4f}")
                writer.add_scalar("train/loss", value, step)
                writer.add_scalar("train/lr", lr_schedule.get_last_lr()[0], step)
        # the optimizer and EMA over every parameter (on rank 0); a collective: every rank asks
        whole = replicas.full(optimizer, ema) if evaluating or saving else (None, None)
        if ranks.main and evaluating:
            row = {"step": step, "train_seconds": round(train_seconds, 1), "loss": value, "val_loss": val_loss()}
            summary = run_eval(whole[1]) if cfg.eval_episodes else {}
            if summary:
                row.update(success_once=summary["success_once"]["rate"], success_at_end=summary["success_at_end"]["rate"],
                           ci95=summary["success_once"]["ci95"], eval_seconds=round(summary["seconds"], 1))
                for key in ("success_once", "success_at_end"):
                    writer.add_scalar(f"eval/{key}", row[key], step)
                if row["success_once"] > best:
                    best = row["success_once"]
                    save("best", *whole)
            history.append(row)
            append_metrics(run_dir, row)
            tqdm.write(json.dumps(row))
            tick = time.perf_counter()  # evaluation time is not training time
        if saving:
            save("last", *whole)
            tick = time.perf_counter()
    bar.close()
    if ranks.main:
        writer.close()
    eval_env.close()
    in_sync = replicas_identical(policy, ranks)
    sharded = replicas.sharded
    del model, replicas  # DDP's reducer must go before its process group, or its destructor can wait forever
    finish(ranks)
    return {"step": step, "train_seconds": train_seconds, "best_success_once": best, "history": history,
            "samples_per_second": step * cfg.batch_size / max(train_seconds, 1e-9), "ranks": ranks.world,
            "gradient_exchange": ranks.exchange, "sharded": sharded, "replicas_identical": in_sync, "main": ranks.main}


def _to(batch: dict, device: torch.device) -> dict:
    return {"obs": {k: v.to(device) for k, v in batch["obs"].items()}, "actions": batch["actions"].to(device)}


def resumable(path: Path) -> dict:
    """The checkpoint a train-teacher run continues from, on the CPU: its RNG states must be there (restore_training
    moves the rest to the policy's device)."""
    state = checkpoints.load(path)
    if state.get("kind") != KIND or "optimizer" not in state:  # a distill checkpoint holds a teacher, not its training
        what = "a distilled head" if "consistency" in state else f"a '{state.get('kind')}'"
        raise UserError(f"{path} holds {what}, not a train-teacher run's state: resume from runs/train-teacher/<run>/checkpoints/last.pt")
    return state


# What a resumed run keeps of its own unless the command line sets it: its budget, data, optimizer, evaluations and seed
# (the evaluations' episodes), so that `resume=true` alone goes on as the run was, not with the defaults'.
RESUMED = ("dataset", "num_demos", "val_fraction", "iterations", "minutes", "batch_size", "lr", "weight_decay", "warmup",
           "ema_power", "eval_every", "eval_episodes", "checkpoint_every", "seed")


def main(cfg: DictConfig) -> dict:
    from hydra.core.hydra_config import HydraConfig

    from robodistill.configs import given_fields

    raw = OmegaConf.to_container(cfg, resolve=True)
    config = TrainTeacherConfig(**{**raw, "env": EnvConfig.from_mapping(raw["env"]), "policy": DiffusionConfig(**raw["policy"])})
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    resume_path = find_resume(config.resume, config.resume_from, config.name, run_dir)
    saved = None
    if resume_path is not None:  # read once: its kind checked, then its env and settings taken, then trained on
        saved = resumable(resume_path)
        config.env = resumed_env(config.env, resume_path, given_fields(), saved.get("env") or {})
        config = resumed_trainer(config, saved, RESUMED, given_fields(), resume_path)
    result = train(config, run_dir, saved)
    if not result["main"]:
        return result
    if result["ranks"] > 1:
        print(describe(result))
    best = result["best_success_once"]
    print(f"trained {result['step']} iterations in {result['train_seconds']:.0f}s ({result['samples_per_second']:.0f} samples/s)"
          + (f"; best success_once {best:.1%}" if best >= 0 else "; not evaluated (eval_episodes=0)") + schedule_note(result["step"], config.iterations, config.warmup))
    print(f"checkpoints: {run_dir / 'checkpoints'}")
    write_run_curves(run_dir, "train-teacher")
    return result
