"""Hydra configs, one file per command plus groups (env/, ...); installed as robodistill.configs."""

import dataclasses
import difflib
import importlib
import typing

from hydra.core.config_store import ConfigStore

from robodistill.errors import UserError

# command -> (module, dataclass) of the typed schema its yaml builds on (`schema/<command>`).
SCHEMAS = {
    "eval": ("robodistill.evaluation", "EvalConfig"),
    "demos": ("robodistill.demos", "DemosConfig"),
    "train-teacher": ("robodistill.training.teacher", "TrainTeacherConfig"),
    "agv-train": ("robodistill.training.ppo_rnd", "AGVTrainConfig"),
    "distill": ("robodistill.training.distill", "DistillConfig"),
    "train-vla": ("robodistill.training.vla", "TrainVLAConfig"),
    "bench-latency": ("robodistill.inference.latency", "BenchLatencyConfig"),
    "export": ("robodistill.deploy.export", "ExportConfig"),
    "serve": ("robodistill.deploy.server", "ServeConfig"),
    "control": ("robodistill.deploy.controller", "ControlConfig"),
    "rpd": ("robodistill.training.rpd", "RPDConfig"),
    "rl100": ("robodistill.training.rl100", "RL100Config"),
}


LAUNCH_KEYS = ("launcher", "nproc")  # read by robodistill.launcher.launch, not fields


def schema(command: str) -> type:
    module, name = SCHEMAS[command]
    return getattr(importlib.import_module(module), name)


def check_overrides(command: str, overrides: list[str]) -> None:
    """Every `key=value` names a field of the command, or it is an error naming the closest field.
    Hydra's own message suggests `+key=value` instead, which it then accepts and the command ignores."""
    for arg in overrides:
        if arg.startswith("-") or "=" not in arg:
            continue
        key = arg.split("=", 1)[0].lstrip("+~")
        if key.replace("/", ".").split(".")[0] in ("hydra", *LAUNCH_KEYS) or "@" in key:  # hydra's own, e.g. hydra/launcher=
            continue
        node, path = schema(command), []
        for part in key.split("."):
            if node is None:
                raise UserError(f"{arg}: {'.'.join(path)} of `robodistill {command}` is one value, not a group of fields")
            names = [f.name for f in dataclasses.fields(node)]
            if part not in names:
                near = difflib.get_close_matches(part, names, n=1)
                hint = f" (did you mean {'.'.join([*path, near[0]])}=?)" if near else ""
                raise UserError(f"{arg}: `robodistill {command}` has no field {'.'.join([*path, part])}{hint}; "
                                f"`robodistill {command} --help` lists them")
            path.append(part)
            hint = typing.get_type_hints(node)[part]
            node = next((t for t in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(t)), None)


def given_fields() -> set[str]:
    """The config fields the running command's command line sets (`key=`, `+key=`, `~key`)."""
    from hydra.core.hydra_config import HydraConfig

    return {o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task}


def register_schemas(command: str) -> None:
    """The typed schemas `command`'s yaml builds on (its own and env's), so a misspelled or mistyped
    field is an error. Only these are imported: every other command's module stays unloaded."""
    from omegaconf import OmegaConf

    from robodistill.envs.factory import EnvConfig

    if not OmegaConf.has_resolver("slug"):  # a run's name may be a task id such as robodistill/AGVWarehouse-v0
        OmegaConf.register_new_resolver("slug", lambda text: str(text).replace("/", "-"))
    store = ConfigStore.instance()
    store.store(group="schema", name="env", node=EnvConfig)
    store.store(group="schema", name=command.replace("agv-train", "agv_train"), node=schema(command))
