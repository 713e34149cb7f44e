"""`robodistill distill`: a one-step consistency head for a trained Diffusion Policy teacher.

Reads top to bottom: teacher + observations -> head warm-started from the teacher's denoiser ->
optimisation loop of one of two variants -> a checkpoint that holds the teacher and the head, so
`robodistill eval policy=<it> sampler=consistency steps=1` (or the teacher's own samplers) runs it.

Variants (`variant=`), both on the teacher's frozen observation encoder:
- `regression` (RL-100's same-noise head): from noise x_T the teacher runs its deterministic DDIM
  chain; the head learns to map x_T (at the top timestep) and every state of that chain (at its
  timestep) straight to the chain's end. Needs only observations.
- `consistency` (LCM / ManiCM discrete consistency distillation): a demonstrated chunk is noised to
  t, the teacher takes one DDIM step from t to t - skip, and the head at t must match a slowly moving
  (EMA 0.95) copy of itself at t - skip; f(x, 0) = x anchors the chain at clean chunks.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from diffusers import DDIMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from omegaconf import DictConfig, OmegaConf
from torch.nn import functional as F
from tqdm import tqdm

from robodistill import checkpoints
from robodistill.data import Horizons, WindowDataset, load_episodes, sample_batches
from robodistill.data.trajectories import episode_seeds, seeds_by_file
from robodistill.envs import EnvConfig, make_env, zero_action_holds_still
from robodistill.errors import UserError
from robodistill.evaluation import HELD_OUT_SEEDS, check_apart, evaluate, rated_seeds
from robodistill.inference.samplers import clip_clean, ddim_step
from robodistill.policies.diffusion.consistency import VARIANTS, ConsistencyHead
from robodistill.policies.diffusion.policy import KIND, DiffusionPolicy
from robodistill.summary import counted
from robodistill.training.distributed import any_rank, data_parallel, describe, finish, finite_loss, replicas_identical, setup
from robodistill.training.runs import (absolute_paths, check_budget, check_eval_episodes, check_optimizer, check_unfinished, find_resume, load_optimization,
                                      resumed_settings, schedule_note, set_threads, tensorboard)


@dataclass
class DistillConfig:
    """`robodistill distill` (configs/distill.yaml)."""

    teacher: str = ""  # a train-teacher checkpoint (best.pt or last.pt)
    variant: str = "regression"  # regression (RL-100 same-noise) or consistency (LCM/ManiCM)
    dataset: str | None = None  # observations (and, for `consistency`, chunks); default: the teacher's dataset
    teacher_steps: int = 10  # regression: the teacher's DDIM steps whose chain end is the target
    skip: int = 10  # consistency: timesteps one teacher DDIM step spans (ManiCM: 10 of 100)
    target_decay: float = 0.95  # consistency: EMA rate of the target copy of the head
    iterations: int = 5000
    minutes: float | None = None  # also stop after this much training time
    batch_size: int = 256
    lr: float = 1e-4
    warmup: int = 200
    eval_episodes: int = 50  # success of sampler=consistency steps=1 at the end; 0: none
    checkpoint_every: int = 500
    threads: int = 2  # CPU threads, all ranks together (launcher=torchrun nproc=N: threads // N each)
    device: str = "auto"
    resume: bool = False  # continue from the newest checkpoints/last.pt of a run with this name
    resume_from: str | None = None
    seed: int = 0
    name: str = "distill"


def train(cfg: DistillConfig, run_dir: Path) -> dict:
    ranks, device = setup(cfg.device)
    set_threads(cfg.threads, ranks.world)
    torch.manual_seed(cfg.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    check_budget(cfg.iterations, cfg.batch_size, cfg.minutes, cfg.checkpoint_every)
    check_optimizer(cfg.lr, cfg.warmup)
    check_eval_episodes(cfg.eval_episodes)
    if cfg.batch_size % ranks.world:
        raise UserError(f"batch_size={cfg.batch_size} (the global batch) must divide evenly over nproc={ranks.world} ranks")
    if cfg.variant not in VARIANTS:
        raise UserError(f"variant='{cfg.variant}' is not one of {', '.join(VARIANTS)}")
    if cfg.variant == "consistency" and not 0 <= cfg.target_decay < 1:  # diffusers' EMA would quietly clip it into range
        raise UserError(f"target_decay={cfg.target_decay} must be in [0, 1) (the EMA rate of the head's target copy; ManiCM: 0.95)")
    if not cfg.teacher or not Path(cfg.teacher).is_file():
        why = "no such file" if cfg.teacher else "required"
        raise UserError(f"teacher={cfg.teacher!r}: {why}; give the path of a train-teacher checkpoint (runs/train-teacher/<run>/checkpoints/last.pt)")
    cfg = replace(cfg, teacher=absolute_paths(cfg.teacher), dataset=cfg.dataset and absolute_paths(cfg.dataset))
    # Read on the CPU and cut to what distillation keeps (what its own checkpoints carry): read onto `device`, the teacher's
    # training state besides (weights, EMA shadows, Adam's two moments: 4x the EMA weights) was held there all run long.
    payload = checkpoints.load(cfg.teacher)
    payload = {k: payload.get(k) for k in ("kind", "policy", "env", "train", "ema")}
    if payload.get("kind") != KIND:
        raise UserError(f"teacher={cfg.teacher} holds a '{payload.get('kind')}', not a Diffusion Policy teacher")
    teacher = DiffusionPolicy.from_spec(payload["policy"])
    teacher.load_state_dict(payload["ema"])
    teacher.to(device).eval().requires_grad_(False)
    n_train = teacher.cfg.num_train_timesteps
    if cfg.variant == "consistency" and not 1 <= cfg.skip < n_train:
        raise UserError(f"skip={cfg.skip} must be between 1 and {n_train - 1}")
    if cfg.variant == "regression" and not 1 <= cfg.teacher_steps <= n_train:
        raise UserError(f"teacher_steps={cfg.teacher_steps} must be between 1 and the teacher's {n_train} training timesteps")

    # ---- data: the teacher's own observations (windows with its horizons)
    env_cfg = EnvConfig.from_mapping(payload["env"])
    dataset = cfg.dataset or payload["train"]["dataset"]
    episodes = load_episodes(dataset.split(","), control_mode=env_cfg.control_mode, obs_mode=env_cfg.obs_mode, task=env_cfg.task)
    rgb = episodes[0].obs.get("rgb")  # the teacher's CNN pools over any size: a head fitted on others would go unnoticed
    if rgb is not None and rgb.shape[1:3] != (env_cfg.image_size, env_cfg.image_size):
        raise UserError(f"dataset={dataset} holds {rgb.shape[2]}x{rgb.shape[1]} px images, but the teacher saw {env_cfg.image_size} px "
                        f"ones (its env.image_size): give a dataset recorded with env.image_size={env_cfg.image_size}, such as the "
                        f"teacher's own ({payload['train']['dataset']}, the default)")
    # the head learns the teacher's actions: the teacher's own demonstrations are its training data too, where still on disk
    taught = [d for d in payload["train"]["dataset"].split(",") if Path(d).is_file()]
    check_apart({**episode_seeds(taught), **seeds_by_file(episodes)}, rated_seeds(cfg.seed, cfg.eval_episodes))
    p = teacher.cfg
    windows = WindowDataset(episodes, Horizons(p.obs_horizon, p.pred_horizon, p.act_horizon),
                            delta_actions=zero_action_holds_still(env_cfg.control_mode))

    # ---- the head, warm-started from the teacher's denoiser; its target copy for `consistency`
    head = ConsistencyHead.from_denoiser(teacher.denoiser).to(device).requires_grad_(True).train()
    model = data_parallel(head, ranks)  # averages gradients in backward
    target = copy.deepcopy(head).requires_grad_(False)
    target_ema = EMAModel(head.parameters(), decay=cfg.target_decay, foreach=True)
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=1e-6, fused=True)
    lr_schedule = get_scheduler("cosine", optimizer, num_warmup_steps=cfg.warmup, num_training_steps=cfg.iterations)
    ddim = DDIMScheduler.from_config(teacher.noise_scheduler.config)
    ddim.set_timesteps(cfg.teacher_steps, device=device)
    alphas = teacher.noise_scheduler.alphas_cumprod.to(device)
    step, train_seconds = 0, 0.0
    batch_gen = torch.Generator().manual_seed(cfg.seed)

    resume_path = find_resume(cfg.resume, cfg.resume_from, cfg.name, run_dir)
    if resume_path is not None:
        state = checkpoints.load(resume_path)  # on the CPU, where its RNG states must be
        done = state.get("consistency", {})
        if done.get("config", {}).get("variant") != cfg.variant or state.get("policy") != payload["policy"]:
            raise UserError(f"{resume_path} is not a '{cfg.variant}' distillation of this teacher: start a new run (another name=)")
        head.load_state_dict(done["weights"])
        load_optimization(optimizer, lr_schedule, done["optimizer"], done["lr_schedule"])
        target_ema.load_state_dict(done["target_ema"])
        target_ema.to(device=device)  # its shadow weights are the checkpoint's tensors
        target_ema.decay = cfg.target_decay  # the saved state's would win over the one given
        step, train_seconds = done["step"], done["train_seconds"]
        checkpoints.set_rng_state(done["rng"])
        batch_gen.set_state(done["batch_rng"])
        check_unfinished(resume_path, step, cfg.iterations, seconds=train_seconds, minutes=cfg.minutes)
        print(f"resumed from {resume_path} at iteration {step}")

    def state() -> dict:
        return {
            **{k: payload[k] for k in ("kind", "policy", "env", "train", "ema")},
            "consistency": {
                "weights": head.state_dict(), "config": asdict(cfg), "step": step, "train_seconds": train_seconds,
                "optimizer": optimizer.state_dict(), "lr_schedule": lr_schedule.state_dict(),
                "target_ema": target_ema.state_dict(), "rng": checkpoints.rng_state(), "batch_rng": batch_gen.get_state(),
            },
        }
    ckpt_path = run_dir / "checkpoints" / "last.pt"

    def regression_loss(cond: torch.Tensor, shape: tuple) -> torch.Tensor:
        """Head(x at its timestep) -> the end of the teacher's DDIM chain through x, for x_T and one
        random state of the chain per sample."""
        x = torch.randn(shape, device=device)
        states, times = [x], [torch.full((shape[0],), n_train - 1, device=device)]
        with torch.no_grad():
            stride = n_train // cfg.teacher_steps
            for t in ddim.timesteps:
                x = ddim.step(teacher.denoiser(x, t.expand(shape[0]), cond), t, x).prev_sample
                states.append(x)
                times.append((t - stride).clamp(min=0).expand(shape[0]))  # where the step landed
            end = clip_clean(x, teacher.noise_scheduler)
            x_in, t_in = [states[0]], [times[0]]
            if len(states) > 2:  # a one-step chain has no state inside it
                pick = torch.randint(1, len(states) - 1, (shape[0],), device=device)
                x_in.append(torch.stack(states[:-1], 1)[torch.arange(shape[0], device=device), pick])
                t_in.append(torch.stack(times[:-1], 1)[torch.arange(shape[0], device=device), pick])
        n = len(x_in)
        return F.mse_loss(model(torch.cat(x_in), torch.cat(t_in).long(), torch.cat([cond] * n)), torch.cat([end] * n))

    def consistency_loss(cond: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """Head at t (noised demo chunk) -> target copy at t - skip after one teacher DDIM step."""
        b = x0.shape[0]
        t_hi = torch.randint(cfg.skip, n_train, (b,), device=device)
        t_lo = t_hi - cfg.skip
        x_hi = teacher.noise_scheduler.add_noise(x0, torch.randn_like(x0), t_hi)
        with torch.no_grad():  # the teacher's own ddim sampler's step (its epsilon is not the clipped estimate's)
            x_lo = ddim_step(teacher.denoiser(x_hi, t_hi, cond), x_hi, alphas[t_hi].view(-1, 1, 1), alphas[t_lo].view(-1, 1, 1),
                             teacher.noise_scheduler)
            goal = target(x_lo, t_lo, cond)
        return F.mse_loss(model(x_hi, t_hi, cond), goal)

    # ---- optimisation
    if ranks.world > 1:  # each rank its own noise and timesteps (weights stay identical)
        torch.manual_seed(cfg.seed * 1000 + 100 * ranks.rank + step)
    writer = tensorboard(run_dir, step) if ranks.main else None
    batches = sample_batches(windows, cfg.batch_size, batch_gen, part=(ranks.rank, ranks.world))
    bar = tqdm(total=cfg.iterations, initial=step, desc=f"distill ({cfg.variant})", unit="it", disable=not ranks.main)
    tick = time.perf_counter()
    # Every rank leaves the loop on one shared decision, taken on rank 0's clock: it skips the time rank 0
    # spends evaluating and saving, which the other ranks' clocks count as waiting.
    last = step >= cfg.iterations or (cfg.minutes is not None and train_seconds >= cfg.minutes * 60)
    while not last:
        batch = next(batches)
        obs = {k: v.to(device) for k, v in batch["obs"].items()}
        with torch.no_grad():
            cond = teacher.condition(obs)
        if cfg.variant == "regression":
            loss = regression_loss(cond, (cond.shape[0], p.pred_horizon, teacher.dims["action_dim"]))
        else:
            target_ema.copy_to(target.parameters())
            loss = consistency_loss(cond, teacher.normalizers["actions"](batch["actions"].to(device)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_schedule.step()
        target_ema.step(head.parameters())
        step += 1
        bar.update(1)
        now = time.perf_counter()
        train_seconds += now - tick
        tick = now
        out_of_time = ranks.main and cfg.minutes is not None and train_seconds >= cfg.minutes * 60
        last = step >= cfg.iterations or (cfg.minutes is not None and any_rank(out_of_time, ranks))
        if step % 50 == 0 or step % cfg.checkpoint_every == 0 or last:  # checked before a head that diverged is saved
            value = finite_loss(loss, step, cfg.lr, ranks)
            if step % 50 == 0 and ranks.main:
                bar.set_postfix(refresh=False, loss=f"{value:.5f}")
                writer.add_scalar("distill/loss", value, step)
        if step % cfg.checkpoint_every == 0 and not last and ranks.main:
            checkpoints.save(ckpt_path, state())
            tick = time.perf_counter()
    bar.close()
    in_sync = replicas_identical(head, ranks)
    model = None  # DDP's reducer must go before its process group, or its destructor can wait forever
    finish(ranks)
    result = {"step": step, "train_seconds": round(train_seconds, 1), "variant": cfg.variant, "ranks": ranks.world,
              "gradient_exchange": ranks.exchange, "replicas_identical": in_sync,
              "samples_per_second": round(step * cfg.batch_size / max(train_seconds, 1e-9), 1)}
    if not ranks.main:
        return {**result, "main": False}
    writer.close()
    finished = state()  # before the evaluation draws from the RNGs it holds
    if cfg.eval_episodes:
        teacher.consistency = head.eval()
        teacher.set_sampler("consistency", 1)
        with make_env(env_cfg, ignore_terminations=True) as env:
            report = evaluate(teacher, env, cfg.eval_episodes, seed=HELD_OUT_SEEDS + cfg.seed)
        result["consistency_1"] = report.summary
        print(report.table(f"consistency head, 1 step, on {env_cfg.task} ({counted(cfg.eval_episodes, 'episode')}, seed {HELD_OUT_SEEDS + cfg.seed})"))
    checkpoints.write_json(run_dir / "result.json", result)
    # The finished checkpoint comes after the final evaluation: a run killed during that evaluation resumes from
    # the checkpoint before and evaluates again, where one at its full budget would be refused as already trained.
    checkpoints.save(ckpt_path, finished)
    return {**result, "main": True}


# What a resumed run keeps of its own unless the command line sets it: its teacher, variant, data, budget, optimizer,
# evaluation and seed, so that `resume=true` alone goes on as the run was, not with the defaults'.
RESUMED = ("teacher", "variant", "dataset", "teacher_steps", "skip", "target_decay", "iterations", "minutes", "batch_size", "lr",
           "warmup", "eval_episodes", "checkpoint_every", "seed")


def resumed_config(cfg: DistillConfig, path: Path, given: set[str]) -> DistillConfig:
    """`cfg` as the run that the checkpoint `path` continues was trained, where `given` leaves a field unset (see RESUMED)."""
    state = checkpoints.load(path)
    if "consistency" not in state:
        raise UserError(f"{path} holds no distilled head, so no distill run's state: resume from runs/distill/<run>/checkpoints/last.pt")
    return replace(cfg, **resumed_settings(cfg, state["consistency"]["config"], RESUMED, given))


def main(cfg: DictConfig) -> dict:
    from hydra.core.hydra_config import HydraConfig

    from robodistill.configs import given_fields

    config = DistillConfig(**OmegaConf.to_container(cfg, resolve=True))
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    resume_path = find_resume(config.resume, config.resume_from, config.name, run_dir)
    if resume_path is not None:
        config = resumed_config(config, resume_path, given_fields())
    result = train(config, run_dir)
    if not result.pop("main"):
        return result
    if result["ranks"] > 1:
        print(describe(result))
    print(f"distilled {result['step']} iterations in {result['train_seconds']:.0f}s; "
          f"checkpoint (teacher + head): {run_dir / 'checkpoints' / 'last.pt'}" + schedule_note(result["step"], config.iterations, config.warmup))
    return result
