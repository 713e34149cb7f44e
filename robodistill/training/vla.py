"""`robodistill train-vla`: the small multi-task VLA, by imitation of RGB demonstrations.

Reads top to bottom: demos per task (made with `robodistill demos` where missing) -> the model
(`robodistill.policies.vla`) with the training phrasings embedded once by the frozen sentence
encoder -> optimisation with EMA, where every batch holds each task equally and each sample one of
its task's phrasings at random -> periodic evaluation on every task (success with intervals) ->
atomic checkpoints (last, and best by mean success over tasks) and resume.
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
from robodistill.data import Horizons, WindowDataset, fit_normalizers, load_episodes, sample_batches
from robodistill.data.trajectories import demos_file, seeds_by_file
from robodistill.envs import EnvConfig, make_env, zero_action_holds_still
from robodistill.errors import UserError
from robodistill.evaluation import HELD_OUT_SEEDS, check_apart, evaluate, rated_seeds
from robodistill.policies.diffusion.config import DiffusionConfig
from robodistill.policies.diffusion.encoders import check_image_size
from robodistill.policies.vla.instructions import phrasings
from robodistill.policies.vla.policy import KIND, VLAPolicy
from robodistill.policies.vla.text import TextEncoder
from robodistill.training.distributed import finite_loss
from robodistill.training.runs import append_metrics, carry_best, carry_metrics, check_budget, check_eval_episodes, check_optimizer, check_unfinished, ema_weights, find_resume, pick_device, restore_training, resumed_trainer, schedule_note, set_threads, tensorboard, training_state


@dataclass
class TrainVLAConfig:
    """`robodistill train-vla` (configs/train-vla.yaml)."""

    tasks: list[str] = field(default_factory=lambda: ["PushCube-v1", "PickCube-v1", "PullCube-v1", "LiftPegUpright-v1"])
    demos: int = 20  # motion-planning demos per task
    demo_seed: int = 0
    datasets: str = "datasets"  # demos at <datasets>/<task>/mp_n<demos>_seed<demo_seed>.rgb.<control_mode>.h5; made if missing
    workers: int = 2  # planning processes when demos are made
    control_mode: str = "pd_ee_delta_pose"  # one for all tasks (LiftPegUpright needs rotations: not pd_ee_delta_pos)
    image_size: int = 64
    max_episode_steps: int = 200  # evaluation; motion-planning demos run up to ~180 steps (LiftPegUpright)
    policy: DiffusionConfig = field(default_factory=DiffusionConfig)
    iterations: int = 20000
    minutes: float | None = None  # also stop after this much training time (evaluation excluded)
    batch_size: int = 64  # all tasks together, in equal parts
    lr: float = 1e-3
    weight_decay: float = 1e-6
    warmup: int = 500
    ema_power: float = 0.75
    eval_every: int = 2000  # iterations; 0: only at the end
    eval_episodes: int = 10  # per task
    checkpoint_every: int = 1000
    threads: int = 2
    device: str = "auto"
    resume: bool = False  # continue from the newest checkpoints/last.pt of a run with this name
    resume_from: str | None = None
    seed: int = 0
    name: str = "vla"


def task_env(cfg: TrainVLAConfig, task: str) -> EnvConfig:
    return EnvConfig(task=task, obs_mode="rgb", control_mode=cfg.control_mode, image_size=cfg.image_size,
                     max_episode_steps=cfg.max_episode_steps)


def demos_for(cfg: TrainVLAConfig, task: str) -> Path:
    """The task's demonstrations, made now by `robodistill demos` if they are not on disk."""
    from robodistill.demos import DemosConfig, generate

    path = Path(cfg.datasets) / task / demos_file(cfg.demos, cfg.demo_seed, "rgb", cfg.control_mode)
    if not path.is_file():
        print(f"making {cfg.demos} {task} demos ({cfg.image_size}px RGB, {cfg.control_mode}) in {path.parent}")
        generate(DemosConfig(env=task_env(cfg, task), n=cfg.demos, seed=cfg.demo_seed, workers=cfg.workers, out=str(path.parent)))
    return path


def train(cfg: TrainVLAConfig, run_dir: Path) -> dict:
    set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not cfg.tasks:
        raise UserError("tasks= is empty: name at least one task, e.g. tasks=[PushCube-v1,PickCube-v1]")
    twice = sorted({t for t in cfg.tasks if cfg.tasks.count(t) > 1})
    if twice:  # each task's phrasings are embedded once: a second entry would index past them
        raise UserError(f"tasks= names {', '.join(twice)} more than once: name each task once (every batch holds each equally)")
    check_budget(cfg.iterations, cfg.batch_size, cfg.minutes, cfg.checkpoint_every)
    check_optimizer(cfg.lr, cfg.warmup, cfg.weight_decay)
    check_eval_episodes(cfg.eval_episodes, every=cfg.eval_every)
    if cfg.demos < 1:
        raise UserError(f"demos={cfg.demos} must be >= 1 (demonstrations per task)")
    check_image_size(cfg.image_size, cfg.policy.crop, "image_size")
    if cfg.batch_size < len(cfg.tasks):
        raise UserError(f"batch_size={cfg.batch_size} is smaller than the {len(cfg.tasks)} tasks it must hold")
    if Path(cfg.datasets).exists() and not Path(cfg.datasets).is_dir():
        raise UserError(f"datasets={cfg.datasets} is a file: give the folder that holds (or will hold) <task>/mp_n*.h5")
    cfg = replace(cfg, datasets=str(Path(cfg.datasets).resolve()))  # recorded so: a resumed run finds its demos from any directory
    resume_path = find_resume(cfg.resume, cfg.resume_from, cfg.name, run_dir)  # before minutes of making demos
    prompts = {task: phrasings(task) for task in cfg.tasks}

    # One env per task for evaluation (and its action bounds); made first, so a bad env field is said before minutes of demos.
    eval_envs = {task: make_env(task_env(cfg, task), ignore_terminations=True, flags="") for task in cfg.tasks}

    # ---- data: every task's windows; states zero-padded to the longest task's
    episodes = {}
    for task in cfg.tasks:
        path = demos_for(cfg, task)
        eps = load_episodes([str(path)], control_mode=cfg.control_mode, obs_mode="rgb", task=task)
        check_apart(seeds_by_file(eps), rated_seeds(cfg.seed, cfg.eval_episodes))
        size = eps[0].obs["rgb"].shape[1]
        if size != cfg.image_size:
            raise UserError(f"{path} holds {size}px images, not image_size={cfg.image_size}: move it away or set image_size={size}")
        episodes[task] = eps
    state_dims = {task: eps[0].obs["state"].shape[1] for task, eps in episodes.items()}
    state_dim = max(state_dims.values())
    for eps in episodes.values():
        for ep in eps:
            ep.obs["state"] = np.pad(ep.obs["state"], ((0, 0), (0, state_dim - ep.obs["state"].shape[1])))
    p = cfg.policy
    horizons = Horizons(p.obs_horizon, p.pred_horizon, p.act_horizon)
    delta = zero_action_holds_still(cfg.control_mode)
    windows = {task: WindowDataset(eps, horizons, delta_actions=delta) for task, eps in episodes.items()}
    every = [ep for eps in episodes.values() for ep in eps]

    # ---- model
    for task, env in eval_envs.items():
        if env.single_observation_space["state"].shape[0] != state_dims[task]:
            raise UserError(f"{task}: the demos' states have {state_dims[task]} dims, the env's {env.single_observation_space['state'].shape[0]}")
    first = eval_envs[cfg.tasks[0]]
    actions = np.concatenate([ep.actions for ep in every])
    gripper_dims = [d for d in range(actions.shape[1]) if np.isin(actions[:, d], (-1.0, 1.0)).all()]
    policy = VLAPolicy(p, state_dim, actions.shape[1], first.action_low.cpu(), first.action_high.cpu(), every[0].obs["rgb"].shape[-1],
                       gripper_dims, state_dims, prompts)
    policy.load_normalizers(fit_normalizers(every, p.normalizer))
    text = TextEncoder()
    policy.prompt_embeddings.copy_(text([t for texts in prompts.values() for t in texts]))
    # The phrasings' rows in prompt_embeddings, per task (for drawing one per sample).
    rows, offset = {}, 0
    for task in cfg.tasks:
        rows[task] = torch.arange(offset, offset + len(prompts[task]))
        offset += len(prompts[task])
    policy.to(device)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    lr_schedule = get_scheduler("cosine", optimizer, num_warmup_steps=cfg.warmup, num_training_steps=cfg.iterations)
    ema = EMAModel(policy.parameters(), decay=0.9999, use_ema_warmup=True, power=cfg.ema_power, foreach=True)
    ema_policy = VLAPolicy.from_spec(policy.spec()).to(device)
    step, best, train_seconds = 0, -1.0, 0.0
    batch_gen = torch.Generator().manual_seed(cfg.seed)

    if resume_path is not None:
        state = checkpoints.load(resume_path)  # on the CPU, where its RNG states must be (restore_training moves the rest)
        if state["policy"] != policy.spec():  # its kind and step were checked before the demos (resumed_config)
            raise UserError(f"{resume_path} was written for another VLA config or task set: start a new run (another name=)")
        restore_training(state, policy, optimizer, lr_schedule, ema, batch_gen)
        step, best, train_seconds = state["step"], state["best"], state["train_seconds"]
        print(f"resumed from {resume_path} at iteration {step}")

    def save(name: str) -> None:
        checkpoints.save(run_dir / "checkpoints" / f"{name}.pt", {
            "kind": KIND, "policy": policy.spec(), "env": {**asdict(task_env(cfg, cfg.tasks[0])), "tasks": list(cfg.tasks)},
            "train": asdict(cfg), "step": step, "best": best, "train_seconds": train_seconds,
            **training_state(policy, optimizer, lr_schedule, ema, batch_gen),
        })

    def run_eval() -> dict[str, dict]:
        ema_policy.load_state_dict(ema_weights(ema, policy))
        ema_policy.eval()
        out = {}
        for task, env in eval_envs.items():
            ema_policy.prompt = prompts[task][0]
            out[task] = evaluate(ema_policy, env, cfg.eval_episodes, seed=HELD_OUT_SEEDS + cfg.seed, progress=False).summary
        return out

    shares = [cfg.batch_size // len(cfg.tasks) + (i < cfg.batch_size % len(cfg.tasks)) for i in range(len(cfg.tasks))]
    streams = [sample_batches(windows[task], n, batch_gen) for task, n in zip(cfg.tasks, shares)]

    def next_batch() -> dict:
        parts = [next(s) for s in streams]
        pick = [rows[task][torch.randint(len(rows[task]), (n,), generator=batch_gen)] for task, n in zip(cfg.tasks, shares)]
        obs = {k: torch.cat([b["obs"][k] for b in parts]).to(device) for k in parts[0]["obs"]}
        obs["instruction"] = policy.prompt_embeddings[torch.cat(pick).to(device)]
        return {"obs": obs, "actions": torch.cat([b["actions"] for b in parts]).to(device)}

    # ---- optimisation
    writer = tensorboard(run_dir, step)
    carry_metrics(resume_path, step, run_dir)
    carry_best(resume_path, step, run_dir)
    policy.train()
    bar = tqdm(total=cfg.iterations, initial=step, desc="train-vla", unit="it")
    history: list[dict] = []
    tick = time.perf_counter()
    while step < cfg.iterations and (cfg.minutes is None or train_seconds < cfg.minutes * 60):
        loss = policy.loss(next_batch())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_schedule.step()
        ema.step(policy.parameters())
        step += 1
        bar.update(1)
        now = time.perf_counter()
        train_seconds += now - tick
        tick = now
        last = step >= cfg.iterations or (cfg.minutes is not None and train_seconds >= cfg.minutes * 60)
        evaluating, saving = (cfg.eval_every and step % cfg.eval_every == 0) or last, step % cfg.checkpoint_every == 0 or last
        if step % 50 == 0 or evaluating or saving:  # checked before weights that diverged are saved
            value = finite_loss(loss, step, cfg.lr)
            if step % 50 == 0:
                bar.set_postfix(refresh=False, loss=f"{value:.4f}")
                writer.add_scalar("train/loss", value, step)
        if evaluating:
            row = {"step": step, "train_seconds": round(train_seconds, 1), "loss": value}
            if cfg.eval_episodes:
                per_task = run_eval()
                row["tasks"] = {t: {"success_once": s["success_once"]["rate"], "ci95": s["success_once"]["ci95"]} for t, s in per_task.items()}
                row["mean_success_once"] = float(np.mean([s["success_once"]["rate"] for s in per_task.values()]))
                for t, s in row["tasks"].items():
                    writer.add_scalar(f"eval/{t}/success_once", s["success_once"], step)
                writer.add_scalar("eval/mean_success_once", row["mean_success_once"], step)
                if row["mean_success_once"] > best:
                    best = row["mean_success_once"]
                    save("best")
            history.append(row)
            append_metrics(run_dir, row)
            tqdm.write(json.dumps(row))
            tick = time.perf_counter()  # evaluation time is not training time
        if saving:
            save("last")
            tick = time.perf_counter()
    bar.close()
    writer.close()
    for env in eval_envs.values():
        env.close()
    return {"step": step, "train_seconds": train_seconds, "best_mean_success_once": best, "history": history}


ENV_FIELDS = ("tasks", "control_mode", "image_size", "max_episode_steps")  # train-vla's env.<field>s
# What else a resumed run keeps of its own unless the command line sets it: its demos, budget, optimizer, evaluations and
# seed (the evaluations' episodes), so that `resume=true` alone goes on as the run was, not with the defaults'.
RESUMED = ("demos", "demo_seed", "datasets", "iterations", "minutes", "batch_size", "lr", "weight_decay", "warmup", "ema_power",
           "eval_every", "eval_episodes", "checkpoint_every", "seed")


def resumed_config(cfg: TrainVLAConfig, path: Path, given: set[str]) -> TrainVLAConfig:
    """A resumed run goes on in the envs it trained in and as it was trained: its checkpoint's ENV_FIELDS and RESUMED fill
    those the command line (`given`) leaves unset. A checkpoint it cannot go on from is refused here, before minutes of
    making demos."""
    state = checkpoints.load(path)
    if state.get("kind") != KIND or "optimizer" not in state:
        raise UserError(f"{path} holds a '{state.get('kind')}' checkpoint, not a train-vla run's state: resume from "
                        "runs/train-vla/<run>/checkpoints/last.pt")
    cfg = resumed_trainer(cfg, state, (*ENV_FIELDS, *RESUMED), given, path)
    check_unfinished(path, state["step"], cfg.iterations, seconds=state["train_seconds"], minutes=cfg.minutes)
    return cfg


def main(cfg: DictConfig) -> dict:
    from hydra.core.hydra_config import HydraConfig

    from robodistill.configs import given_fields

    raw = OmegaConf.to_container(cfg, resolve=True)
    config = TrainVLAConfig(**{**raw, "policy": DiffusionConfig(**raw["policy"])})
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    resume_path = find_resume(config.resume, config.resume_from, config.name, run_dir)
    if resume_path is not None:
        config = resumed_config(config, resume_path, given_fields())
    result = train(config, run_dir)
    print(f"trained {result['step']} iterations in {result['train_seconds']:.0f}s" + schedule_note(result["step"], config.iterations, config.warmup))
    final = result["history"][-1] if result["history"] else {}
    if "tasks" in final:
        print("| task | success_once [95% CI] |\n|---|---|")
        for task, s in final["tasks"].items():
            print(f"| {task} | {s['success_once']:.0%} [{s['ci95'][0]:.0%}, {s['ci95'][1]:.0%}] |")
    # eval takes the camera, control mode and episode limit from the checkpoint: only the task is to choose, of several
    task = config.tasks[0] if len(config.tasks) == 1 else f"<{'|'.join(config.tasks)}>"
    print(f"checkpoints: {run_dir / 'checkpoints'}  (robodistill eval policy={run_dir / 'checkpoints' / 'last.pt'} env={task})")
    write_run_curves(run_dir, "train-vla")
    return result
