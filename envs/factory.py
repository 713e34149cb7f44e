"""One function builds every environment: `make_env(EnvConfig(...), seed)` -> `VecEnv`.

CPU (physx_cpu): one env runs in-process; several run one per process (gymnasium's
AsyncVectorEnv over ManiSkill's CPUGymWrapper, one torch thread each). GPU (physx_cuda): ManiSkill's
batched envs in this process. Both come back as the same `VecEnv` (see vector.py).
"""

from __future__ import annotations

import difflib
import functools
import multiprocessing
import os
import signal
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

import gymnasium as gym

from robodistill.envs.vector import Filmed, SeededAutoReset, VecEnv, single_env
from robodistill.errors import UserError

# Tasks run and tested here (CPU, no downloaded assets). Any other registered ManiSkill task that
# needs no downloads works too; these are the ones we vouch for.
SUPPORTED_TASKS = (
    "PushCube-v1",
    "PickCube-v1",
    "StackCube-v1",
    "PullCube-v1",
    "PegInsertionSide-v1",
    "LiftPegUpright-v1",
    "PushT-v1",
    "PokeCube-v1",
    "RollBall-v1",
    "PlugCharger-v1",
)
OBS_MODES = ("state", "rgb")
SIM_BACKENDS = ("physx_cpu", "physx_cuda")  # and physx_cuda:<n>, GPU n
AGV_TASK = "robodistill/AGVWarehouse-v0"  # envs/agv; imported lazily so ManiSkill users never load it
SETUP_HINT = "run `make setup` (scripts/setup.sh) to install Mesa's lavapipe Vulkan driver"


@dataclass
class EnvConfig:
    """Everything that decides what environment is built. Mirrors configs/env/*.yaml."""

    task: str = "PushCube-v1"
    obs_mode: str = "state"  # state: {"state"}; rgb: {"state", "rgb"} (proprioception + camera)
    control_mode: str | None = "pd_ee_delta_pos"  # None: the task's default
    num_envs: int = 1
    sim_backend: str = "physx_cpu"
    max_episode_steps: int | None = None  # None: the task's default
    reward_mode: str | None = None  # None: the task's default (normalized_dense for the cube tasks)
    image_size: int = 128  # camera width/height for obs_mode=rgb
    render_size: int = 256  # video frame width/height
    scene: str | None = None  # robodistill/AGVWarehouse-v0 only: simple|complex _ static|dynamic (envs/agv)
    collision_penalty: float | None = None  # robodistill/AGVWarehouse-v0 only: a collision's reward is -this (None: 1)

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> "EnvConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise UserError(f"unknown env field(s) {unknown}; valid fields: {sorted(known)}")
        return cls(**dict(cfg))


def zero_action_holds_still(control_mode: str | None) -> bool:
    """Whether a zero arm action means "stay" under this control mode: true for delta and velocity
    control. Under absolute position control zero is a far-away pose, so padding a chunk or stopping
    with zeros would move the arm; None (the task's default) is taken as not delta."""
    return control_mode is not None and ("delta" in control_mode or "vel" in control_mode)


@contextmanager
def signals_held():
    """SIGINT and SIGTERM received inside are raised as they leave it, to the handler there was: ManiSkill imports
    SAPIEN's renderer inside a bare `except:` (mani_skill/render/version.py), which swallowed the KeyboardInterrupt of a
    Ctrl-C landing there, and the run went on as if nothing was pressed. Outside the main thread, nothing is held."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    before = {s: signal.signal(s, lambda signum, frame: held.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
        if held:
            signal.raise_signal(held[0])


def _registered_tasks() -> dict:
    with signals_held():
        import mani_skill.envs  # noqa: F401  (registers the tasks)
    from mani_skill.utils.registration import REGISTERED_ENVS

    return REGISTERED_ENVS


def registered_episode_steps(task: str) -> int | None:
    """The episode limit ManiSkill registers `task` with (it applies that time limit itself, so gymnasium's spec does not
    know it); None for a task it does not register or registers without one."""
    spec = _registered_tasks().get(task)
    return None if spec is None or spec.max_episode_steps is None else int(spec.max_episode_steps)


def _missing_assets(task: str) -> list[str]:
    from mani_skill.utils import assets

    ids = assets.expand_data_group_into_individual_data_source_ids(task) if task in assets.DATA_GROUPS else []
    return [i for i in ids if not assets.is_data_source_downloaded(i)]


def check_task(task: str, flag: str = "env.task") -> None:
    """A registered ManiSkill task with its assets here; the error names `flag`, where the task was given
    (the benchmark scripts take tasks by flags of their own)."""
    tasks = _registered_tasks()
    if task not in tasks:
        near = difflib.get_close_matches(task, [*SUPPORTED_TASKS, *tasks], n=1)
        hint = f"did you mean {flag}={near[0]}? " if near else ""
        raise UserError(f"unknown task '{task}' ({flag}): {hint}Supported tasks: {', '.join(SUPPORTED_TASKS)}; "
                        f"any other registered ManiSkill task that needs no downloaded assets works too")
    missing = _missing_assets(task)
    if missing:
        raise UserError(
            f"task '{task}' needs downloaded assets ({', '.join(missing)}), and downloads are not available "
            f"here. Use a task that needs none: {', '.join(SUPPORTED_TASKS)}"
        )


def _check(cfg: EnvConfig, flags: str) -> None:
    """Fail early, before SAPIEN starts, with an error that names the field (as `flags`<field>) and the choices."""
    for key in ("scene", "collision_penalty"):
        if getattr(cfg, key) is not None:
            raise UserError(f"{flags}{key} applies to {AGV_TASK} only, not to {cfg.task}: drop {flags}{key}")
    check_task(cfg.task, f"{flags}task")
    tasks = _registered_tasks()
    reward_modes = tasks[cfg.task].cls.SUPPORTED_REWARD_MODES
    if cfg.reward_mode is not None and cfg.reward_mode not in reward_modes:
        raise UserError(f"reward_mode '{cfg.reward_mode}' is not valid for {cfg.task} ({flags}reward_mode). Valid: {', '.join(reward_modes)}")
    if cfg.obs_mode not in OBS_MODES:
        raise UserError(f"unknown obs_mode '{cfg.obs_mode}' for {cfg.task} ({flags}obs_mode). Valid: {', '.join(OBS_MODES)}")
    backend, colon, gpu = cfg.sim_backend.partition(":")
    if backend not in SIM_BACKENDS or colon and not (backend == "physx_cuda" and gpu.isdigit()):
        raise UserError(f"unknown sim_backend '{cfg.sim_backend}' ({flags}sim_backend). Valid: {', '.join(SIM_BACKENDS)}, "
                        f"physx_cuda:<n> (GPU n)")
    if cfg.num_envs < 1:
        raise UserError(f"{flags}num_envs must be >= 1, got {cfg.num_envs}")
    if cfg.image_size < 1:
        raise UserError(f"{flags}image_size must be >= 1 (the camera's width and height in pixels), got {cfg.image_size}")
    if cfg.max_episode_steps is not None and cfg.max_episode_steps < 1:
        raise UserError(f"{flags}max_episode_steps must be >= 1 (or null: the task's own limit), got {cfg.max_episode_steps}")
    if gpu and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every rank's simulator on that one GPU, beside its own
        raise UserError(f"{flags}sim_backend={cfg.sim_backend} puts every rank's simulation on GPU {gpu}: under launcher=torchrun "
                        f"give {flags}sim_backend=physx_cuda, which simulates on each rank's own GPU")
    if backend == "physx_cuda" and not _cuda():
        raise UserError(f"{flags}sim_backend={cfg.sim_backend} needs a CUDA GPU and a CUDA build of torch; use physx_cpu here")
    if gpu and int(gpu) >= _cuda_devices():
        raise UserError(f"{flags}sim_backend={cfg.sim_backend}: this machine has {_cuda_devices()} CUDA device(s), "
                        f"physx_cuda:0 to physx_cuda:{_cuda_devices() - 1}")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count()


def _backends(cfg: EnvConfig) -> tuple[str, str]:
    """ManiSkill's sim_backend and render_backend for `cfg`. Plain physx_cuda simulates and renders on this process's
    current CUDA device, the rank's own under launcher=torchrun (training.distributed.setup sets it): given a bare
    "physx_cuda", SAPIEN takes the first CUDA device it finds whatever torch's current device is, so every rank
    simulated on GPU 0, while ManiSkill made its own tensors on torch.device("cuda"), the rank's GPU."""
    if not cfg.sim_backend.startswith("physx_cuda"):
        return cfg.sim_backend, "gpu" if _cuda() else "cpu"  # "gpu": SAPIEN's CUDA renderer; without CUDA, lavapipe directly (no warning)
    import torch

    gpu = cfg.sim_backend.partition(":")[2] or torch.cuda.current_device()
    return f"physx_cuda:{gpu}", f"sapien_cuda:{gpu}"


def gym_kwargs(cfg: EnvConfig, num_envs: int, render: bool) -> dict:
    """Keyword arguments for `gym.make(cfg.task, **kwargs)` of a ManiSkill task."""
    sim_backend, render_backend = _backends(cfg)
    kwargs: dict[str, Any] = dict(
        num_envs=num_envs,
        obs_mode="rgb" if cfg.obs_mode == "rgb" else "state",
        sim_backend=sim_backend,
        render_mode="rgb_array" if render else None,
        human_render_camera_configs=dict(width=cfg.render_size, height=cfg.render_size),
        render_backend=render_backend,
    )
    if cfg.obs_mode == "rgb":
        kwargs["sensor_configs"] = dict(width=cfg.image_size, height=cfg.image_size)
    for key in ("control_mode", "reward_mode", "max_episode_steps"):
        if getattr(cfg, key) is not None:
            kwargs[key] = getattr(cfg, key)
    return kwargs


def _gym_make(cfg: EnvConfig, num_envs: int, render: bool, flags: str, **extra: Any) -> gym.Env:
    try:
        return gym.make(cfg.task, **gym_kwargs(cfg, num_envs, render), **extra)
    except RuntimeError as err:
        if "physical device" in str(err) or "Vulkan" in str(err) or "vk::" in str(err):
            raise UserError(f"no Vulkan device for SAPIEN ({err}); {SETUP_HINT}") from err
        raise
    except (AssertionError, KeyError, NotImplementedError) as err:
        raise UserError(_explain_make_error(cfg, err, flags)) from err


def _explain_make_error(cfg: EnvConfig, err: Exception, flags: str) -> str:
    """ManiSkill rejects a bad control mode with a bare assert: name the valid ones."""
    probe = gym.make(cfg.task, num_envs=1, obs_mode="state", sim_backend="physx_cpu", render_backend="cpu")
    try:
        control_modes = list(probe.unwrapped.agent.supported_control_modes)
    finally:
        probe.close()
    if cfg.control_mode is not None and cfg.control_mode not in control_modes:
        return f"control_mode '{cfg.control_mode}' is not valid for {cfg.task} ({flags}control_mode). Valid: {', '.join(control_modes)}"
    return f"ManiSkill could not build {cfg.task} with {asdict(cfg)}: {err!r}"


def _worker_env(cfg: EnvConfig, render: bool, ignore_terminations: bool, flags: str) -> gym.Env:
    # One thread per env worker: torch's default of one per core makes stepping erratic here.
    import torch
    from mani_skill.utils.wrappers.gymnasium import CPUGymWrapper

    torch.set_num_threads(1)
    # Every episode is seeded (SeededAutoReset): ManiSkill's own seed for an auto-reset is drawn where evaluations rate,
    # and without enhanced_determinism not used at all (torch's global RNG, which a fresh worker process seeds from the
    # OS, lays the episode out). enhanced_determinism also draws the robot's initial joint noise from the episode's seed.
    env = _gym_make(cfg, 1, render, flags, enhanced_determinism=True)
    env = CPUGymWrapper(single_env(env, rgb=cfg.obs_mode == "rgb"), ignore_terminations=ignore_terminations, record_metrics=True)
    return Filmed(SeededAutoReset(env))


def make_env(
    cfg: EnvConfig | Mapping[str, Any],
    *,
    render: bool = False,
    ignore_terminations: bool = False,
    flags: str = "env.",
) -> VecEnv:
    """Build `cfg.num_envs` copies of a ManiSkill task as one `VecEnv`.

    :param render: enable `VecEnv.render()` (videos); costs a render camera per env.
    :param ignore_terminations: run every episode to the time limit (evaluation: success_at_end
        is then meaningful). False: episodes end early on success or failure (RL training).
    :param flags: how the caller's command line spells a field, before its name: errors say
        `<flags>image_size`; "" for a command whose env fields are its own (train-vla's image_size=).
    """
    if not isinstance(cfg, EnvConfig):
        cfg = EnvConfig.from_mapping(cfg)
    if cfg.task == AGV_TASK:
        # Not ManiSkill: a numpy batch of robots in this process, already in the VecEnv convention.
        from robodistill.envs.agv import AGVVecEnv

        return AGVVecEnv(cfg, render=render)
    _check(cfg, flags)
    if cfg.sim_backend.startswith("physx_cuda") or cfg.num_envs == 1:
        from mani_skill.vector.wrappers.gymnasium import ManiSkillVectorEnv

        env = single_env(_gym_make(cfg, cfg.num_envs, render, flags), rgb=cfg.obs_mode == "rgb")
        filmed = Filmed(env)
        vec = ManiSkillVectorEnv(filmed, auto_reset=True, ignore_terminations=ignore_terminations, record_metrics=True)
        return VecEnv(vec, cfg, observation=env.observation, filmed=filmed)
    # AsyncVectorEnv builds one env in this process for the spaces, so config errors surface here.
    make_one = functools.partial(_worker_env, cfg, render, ignore_terminations, flags)
    vec = gym.vector.AsyncVectorEnv(
        [make_one] * cfg.num_envs,
        context="forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn",
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )
    return VecEnv(vec, cfg)
