"""What every policy is to the rest of robodistill, and how one is found by name or checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

import torch

from robodistill import checkpoints
from robodistill.errors import UserError

Obs = dict[str, torch.Tensor]


@runtime_checkable
class Policy(Protocol):
    """Maps a batch of observation histories to action chunks in env units.

    `obs[key]` is (B, obs_horizon, ...); the result is (B, H, A) with H >= act_horizon, of which the
    first `act_horizon` actions are executed before the policy is asked again (receding horizon).
    `streams` names the env of each row; a policy that remembers something between calls (RTI's
    warm start) keys it by stream and also has `reset(streams)`, called when their episodes restart.
    """

    obs_horizon: int
    act_horizon: int

    def predict_chunk(self, obs: Obs, streams: torch.Tensor | None = None) -> torch.Tensor: ...


# Policy kinds that can be rebuilt from a checkpoint: kind -> from_checkpoint(payload, env) -> Policy.
LOADERS: dict[str, Callable] = {}


def register_loader(kind: str):
    def add(from_checkpoint: Callable) -> Callable:
        LOADERS[kind] = from_checkpoint
        return from_checkpoint

    return add


NAMED_POLICIES = ("random", "scripted")  # policy specs that name a policy rather than a file


def load_policy(spec: str | os.PathLike, env, seed: int = 0) -> Policy:
    """`random`, `scripted` (PushCube-v1 only), a bundle directory (`robodistill export`), a VLA in
    Hugging Face format (a directory with config.json), an RL student's SB3 zip (`robodistill rpd`),
    or the path of a checkpoint of a registered policy kind."""
    spec = os.fspath(spec)
    check_policy_spec(spec)
    if spec == "random":
        from robodistill.policies.random import RandomPolicy

        return RandomPolicy(env.action_low, env.action_high, seed=seed)
    if spec == "scripted":
        from robodistill.policies.scripted import PushCubeScripted

        wanted = PushCubeScripted.supported
        have = {k: getattr(env.cfg, k) for k in wanted}
        if have != wanted:
            raise UserError(f"policy=scripted is a PushCube expert for env {wanted}; this env is {have}")
        return PushCubeScripted()
    from robodistill.policies.bundle import is_bundle, load_bundle_policy

    if is_bundle(spec):
        return load_bundle_policy(spec, env, seed=seed)
    from robodistill.policies.vla.hf import is_hf_model, load_hf_vla

    if is_hf_model(spec):
        return load_hf_vla(spec, env)
    if spec.endswith(".zip"):
        from robodistill.policies.student import load_student

        return load_student(spec, env)
    payload = checkpoints.load(spec)
    kind = payload.get("kind")
    if kind not in LOADERS:
        known = ", ".join(sorted(LOADERS)) or "none registered yet"
        raise UserError(f"checkpoint '{spec}' holds a '{kind}', which is not a policy (policy kinds: {known})")
    return LOADERS[kind](payload, env)


def check_policy_spec(spec: str, flag: str = "policy") -> None:
    """Says at once, before a command builds its env, when `spec` (given as `flag=`) is nothing load_policy opens."""
    from robodistill.policies.bundle import METADATA, is_bundle
    from robodistill.policies.vla.hf import is_hf_model

    if spec in NAMED_POLICIES or is_bundle(spec) or is_hf_model(spec) or Path(spec).is_file():
        return
    if not spec:  # Path("") is the current folder: it would be called a folder that holds no policy
        raise UserError(f"{flag}= is empty: give random, scripted, an export bundle directory or a checkpoint file "
                        "(e.g. runs/train-teacher/<run>/checkpoints/last.pt)")
    if Path(spec).is_dir():
        inside = run_output(spec)
        hint = f"; this one holds {flag}={inside}" if inside else ", or a checkpoint file in it (e.g. checkpoints/last.pt)"
        raise UserError(f"{flag} '{spec}' is a folder, but neither an export bundle (with {METADATA}) nor a Hugging Face "
                        f"VLA (with config.json): give one of those{hint}")
    last = Path(spec).with_name("last.pt")
    if Path(spec).name == "best.pt" and last.is_file():
        raise UserError(f"{flag} '{spec}' does not exist: a run writes best.pt at its evaluations (eval_episodes > 0), "
                        f"and this one made none; its final weights are {flag}={last}")
    raise UserError(f"{flag} '{spec}' is neither 'random', 'scripted', a bundle directory nor an existing checkpoint file")


def check_trained_on(what: str, trained_on: dict, env) -> None:
    """Refuses an env whose task, observation or control mode, or camera size (a policy that sees images), differ from
    those `what` was trained on. The camera's too: a CNN that pools its features takes any size, and rates (or teaches
    with) images at a scale it never saw without a word."""
    sees_images = trained_on.get("obs_mode") == "rgb" and "image_size" in trained_on
    theirs = {k: trained_on.get(k) for k in ("task", "obs_mode", "control_mode", *(("image_size",) if sees_images else ()))}
    here = {k: getattr(env.cfg, k) for k in theirs}
    if here != theirs:
        # the settings that match, each as its flag: "env=..." alone sent users to change the task for an obs_mode
        fix = " ".join(f"env={v}" if k == "task" else f"env.{k}={v}" for k, v in theirs.items() if here[k] != v)
        raise UserError(f"{what} was trained on {theirs}, but the env is {here}: set {fix}")


def run_output(run: str | Path) -> Path | None:
    """The policy a command's run directory holds (export's bundle, rpd's student, agv-train's policy, a
    checkpoint; a sweep's directory: its first job's), for a flag given the directory instead; None where it holds none."""
    from robodistill.policies.bundle import is_bundle
    from robodistill.summary import jobs

    if not Path(run).is_dir():
        return None
    first = jobs(Path(run))[0][1]
    held = (first / n for n in ("bundle", "student.zip", "policy.pt", "checkpoints/best.pt", "checkpoints/last.pt"))
    return next((p for p in held if is_bundle(str(p)) or p.is_file()), None)


def trained_env(spec: str) -> dict:
    """The env a policy file records from its training (EnvConfig fields; a VLA adds its `tasks`): a
    bundle's metadata, an RPD student zip, or a diffusion, VLA or AGV checkpoint. {} for `random`,
    `scripted`, a Hugging Face VLA or a file that is none of these (load_policy says what is wrong)."""
    from robodistill.policies.bundle import METADATA, is_bundle

    path = Path(spec)
    if is_bundle(spec):
        try:
            env = json.loads((path / METADATA).read_text()).get("env")
        except (ValueError, AttributeError):  # not JSON, or not an object: the bundle's loader says so
            return {}
        return env if isinstance(env, dict) else {}
    if not path.is_file():
        return {}
    if path.suffix == ".zip":
        from stable_baselines3.common.save_util import load_from_zip_file

        try:
            data = load_from_zip_file(path, load_data=True, device="cpu")[0]
        except Exception:  # not a student zip (SB3 raises several types): load_student names it
            return {}
        return (data or {}).get("robodistill_env") or {}
    return checkpoints.load(path).get("env") or {}


def trained_data(spec: str, task: str) -> list[Path]:
    """The demonstration files a policy checkpoint records it learnt `task` from: a diffusion policy's dataset= (its
    teacher's for a distilled head, and the head's own), a VLA's demos of the task. [] for anything else (a bundle, an
    RPD student or an AGV policy records none)."""
    path = Path(spec)
    if not path.is_file() or path.suffix == ".zip":
        return []
    payload = checkpoints.load(path)
    train = payload.get("train") or {}
    if payload.get("kind") == "vla":
        from robodistill.data.trajectories import demos_file

        if task not in train.get("tasks", []):
            return []
        return [Path(train["datasets"]) / task / demos_file(train["demos"], train["demo_seed"], "rgb", train["control_mode"])]
    head = (payload.get("consistency") or {}).get("config", {}).get("dataset")
    return [Path(d) for d in ",".join(filter(None, (train.get("dataset"), head))).split(",") if d]
