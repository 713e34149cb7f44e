"""Hydra configs, one file per command plus groups (env/, ...); installed as robodistill.configs."""

import importlib

from hydra.core.config_store import ConfigStore

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
    module, name = SCHEMAS[command]
    store = ConfigStore.instance()
    store.store(group="schema", name="env", node=EnvConfig)
    store.store(group="schema", name=command.replace("agv-train", "agv_train"), node=getattr(importlib.import_module(module), name))
