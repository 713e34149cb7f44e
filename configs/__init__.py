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
# One thing, named for its role in each command: a user who gives one command's name to another is pointed
# at that command's own.
SAME_THING = (("policy", "ckpt", "teacher", "init", "bundle"), ("n", "num_demos", "demos"), ("resume", "resume_from"))


def schema(command: str) -> type:
    module, name = SCHEMAS[command]
    return getattr(importlib.import_module(module), name)


def check_overrides(command: str, overrides: list[str]) -> None:
    """Every `key=value` names a field of the command, or a config group of the user's own config folder (`--config-dir`,
    e.g. `+experiment=NAME` from <dir>/experiment/NAME.yaml), or it is an error naming the closest field.
    Hydra's own message suggests `+key=value` instead, which it then accepts and the command ignores."""
    groups = user_groups(overrides)
    for arg in overrides:
        if arg.startswith("-") or "=" not in arg:
            continue
        key = arg.split("=", 1)[0].lstrip("+~")
        if key.replace("/", ".").split(".")[0] in ("hydra", *LAUNCH_KEYS, *groups) or "@" in key:  # hydra's own, e.g. hydra/launcher=
            continue
        node, path = schema(command), []
        for part in key.split("."):
            if node is None:
                raise UserError(f"{arg}: {'.'.join(path)} of `robodistill {command}` is one value, not a group of fields")
            names = [f.name for f in dataclasses.fields(node)]
            if part not in names:
                hints = typing.get_type_hints(node)
                near = difflib.get_close_matches(part, names, n=1) or [  # a value's synonym, never a group of fields
                    n for group in SAME_THING if part in group for n in group if n in names and not _group_of_fields(hints[n])][:1]
                hint = f" (did you mean {'.'.join([*path, near[0]])}=?)" if near else ""
                raise UserError(f"{arg}: `robodistill {command}` has no field {'.'.join([*path, part])}{hint}; "
                                f"`robodistill {command} --help` lists them")
            path.append(part)
            node = _group_of_fields(typing.get_type_hints(node)[part])


CONFIG_DIR_FLAGS = ("-cd", "--config-dir")


def config_dirs(args: list[str]) -> list[str]:
    """The user's own config folders that `args` add to the search path (`--config-dir DIR`, `--config-dir=DIR`)."""
    dirs = [value for flag, value in zip(args, args[1:]) if flag in CONFIG_DIR_FLAGS]
    return dirs + [a.split("=", 1)[1] for a in args if "=" in a and a.split("=", 1)[0] in CONFIG_DIR_FLAGS]


def user_groups(args: list[str]) -> set[str]:
    """The config groups (folders) of the user's config folders, e.g. experiment for +experiment=NAME."""
    from pathlib import Path

    folders = [Path(d) for d in config_dirs(args)]
    return {p.name for d in folders if d.is_dir() for p in d.iterdir() if p.is_dir()}


def _group_of_fields(hint) -> type | None:
    """The dataclass a field's type hint holds (`X`, `X | None`), or None for a plain value."""
    return next((t for t in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(t)), None)


def compose_checked(command: str, overrides: list[str]):
    """The command's config composed with `overrides`; hydra's multi-line composition errors (a value of
    the wrong type, a config group option that does not exist) as one line naming the override."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException, MissingConfigException, OverrideParseException

    with initialize_config_module("robodistill.configs", version_base="1.3"):
        try:
            return compose(command, overrides=overrides)
        except OverrideParseException as err:
            raise UserError(f"{err.override}: {str(err).splitlines()[0]}") from None
        except MissingConfigException as err:
            group, _, option = (err.missing_cfg_file or "").rpartition("/")
            if not group or err.options is None:
                raise UserError(str(err).splitlines()[0]) from None
            near = difflib.get_close_matches(option, err.options, n=1)
            guess = f" (did you mean {group}={near[0]}?)" if near else ""
            hint = f"; any other registered ManiSkill task: env.task={option or '<id>'}" if group == "env" and not near else ""
            raise UserError(f"{group}={option}: there is no such {group} config{guess}. Choose one of: "
                            f"{', '.join(err.options)}{hint}") from None
        except ValueError as err:  # hydra's words for `group=null` (env=null), raised with its traceback
            nulled = [o.split("=", 1)[0].lstrip("+") for o in overrides if o.split("=", 1)[-1] == "null"]
            if "Config group override" not in str(err) or not nulled:
                raise
            raise UserError(f"{nulled[0]}=null: {nulled[0]} is a config group, not a value: choose one of "
                            f"{', '.join(group_options(nulled[0]))}") from None
        except HydraException as err:
            cause = str(err.__cause__).splitlines()[0] if err.__cause__ else ""
            override = str(err).removeprefix("Error merging override ")
            if cause and override != str(err):
                hint = " (a list is written key=[a,b])" if "ListConfig" in cause else ""
                raise UserError(f"{override}: {cause}{hint}") from None
            raise UserError("; ".join(line.strip() for line in str(err).splitlines() if line.strip())) from None


def group_options(group: str) -> list[str]:
    """The options of one of the package's config groups (configs/<group>/<option>.yaml)."""
    from importlib.resources import files

    folder = files("robodistill.configs").joinpath(group)
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml")) if folder.is_dir() else []


def given_fields() -> set[str]:
    """The config fields the running command's command line sets (`key=`, `+key=`, `~key`)."""
    from hydra.core.hydra_config import HydraConfig

    return {o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task}


def record_taken(values: dict, run_dir=None) -> None:
    """Write the fields a command took from elsewhere (a checkpoint, a teacher; dotted keys such as
    `env.max_episode_steps`) into its run's .hydra/config.yaml, so that the config a run keeps is the one it ran
    with, and a later `resume=true` of it finds them. `run_dir`: that run's directory, where it is not the one hydra made
    for this command (rl100 goes on in the run it resumes). Outside a hydra run, and on ranks other than 0, nothing."""
    import os
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    if not values or os.environ.get("RANK", "0") != "0":
        return
    if run_dir is None and HydraConfig.initialized():
        run_dir = OmegaConf.select(HydraConfig.get(), "runtime.output_dir", default=None)  # none under `--cfg job`
    saved = Path(run_dir or "") / ".hydra" / "config.yaml"
    if run_dir and saved.is_file():
        config = OmegaConf.load(saved)
        for key, value in values.items():
            OmegaConf.update(config, key, value, merge=False)
        OmegaConf.save(config, saved)


# The episode limit train-teacher and rl100 train and rate in (their env.max_episode_steps: ${demo_episode_steps:${env.task}}).
# Motion-planning demos run longer than most tasks' own limits (PushCube's ~70 steps, its limit 50): 100 steps, which
# PushCube's and PickCube's benchmark numbers were measured in; the task's own limit where it is longer (PlugCharger:
# 200, its demos ~160); and longer still where the planner's demos outrun both (the longest of a few seeds,
# pd_ee_delta_pos/pose: StackCube 107 steps, LiftPegUpright 183, PegInsertionSide 189).
DEMO_EPISODE_STEPS = {"StackCube-v1": 150, "LiftPegUpright-v1": 250, "PegInsertionSide-v1": 250}


def demo_episode_steps(task: str) -> int:
    """The episode limit for a policy learned from `task`'s motion-planning demos: never shorter than the task's own."""
    from robodistill.envs.factory import registered_episode_steps

    own = registered_episode_steps(task) or 0  # a task ManiSkill lacks keeps 100, and the env's check names it
    return max(100, own, DEMO_EPISODE_STEPS.get(task, 0))


def register_resolvers() -> None:
    """The interpolations our configs use beyond OmegaConf's own (also to resolve a saved run's config)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("slug"):  # a run's name may be a task id such as robodistill/AGVWarehouse-v0
        OmegaConf.register_new_resolver("slug", lambda text: str(text).replace("/", "-"))
    if not OmegaConf.has_resolver("join"):  # a run's name from the fields given, e.g. export's sampler and format
        OmegaConf.register_new_resolver("join", lambda *parts: "-".join(str(p) for p in parts if p is not None))
    if not OmegaConf.has_resolver("demo_episode_steps"):  # train-teacher's and rl100's per-task episode limit
        OmegaConf.register_new_resolver("demo_episode_steps", demo_episode_steps)


def register_schemas(command: str) -> None:
    """The typed schemas `command`'s yaml builds on (its own and env's), so a misspelled or mistyped
    field is an error. Only these are imported: every other command's module stays unloaded."""
    from robodistill.envs.factory import EnvConfig

    register_resolvers()
    store = ConfigStore.instance()
    store.store(group="schema", name="env", node=EnvConfig)
    store.store(group="schema", name=command.replace("agv-train", "agv_train"), node=schema(command))
