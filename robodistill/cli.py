"""`robodistill <command> key=value ...`: one hydra config per command under configs/.

Each command is a function `main(cfg)` in a module; hydra composes `configs/<command>.yaml` with the
overrides, creates the run directory `runs/<command>/<time>-<name>/` and saves the resolved config
there (`.hydra/config.yaml`). Every hydra flag works (`--cfg job`, `-m` sweeps, ...).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import re
import shutil
import signal
import sys
import threading
from pathlib import Path

import hydra
from omegaconf import DictConfig

from robodistill.configs import LAUNCH_KEYS, check_overrides, compose_checked, config_dirs, group_options, register_schemas
from robodistill.errors import CutShort, UserError
from robodistill.summary import RUN_STAMP

# command -> (module with main(cfg), one-line summary); ARGV_COMMANDS take plain arguments, no hydra.
COMMANDS: dict[str, tuple[str, str]] = {
    "eval": ("robodistill.evaluation", "roll out a policy; success rates with 95% Wilson intervals, eval.json, videos"),
    "demos": ("robodistill.demos", "motion-planning demonstrations in ManiSkill's trajectory format, converted to any obs/control mode"),
    "train-teacher": ("robodistill.training.teacher", "train the Diffusion Policy teacher on demonstrations (EMA, periodic eval, checkpoints, resume)"),
    "train-vla": ("robodistill.training.vla", "train the small multi-task VLA (sentence-encoded instructions, RGB, action chunks) on demos of several tasks"),
    "distill": ("robodistill.training.distill", "distill a teacher checkpoint into a one-step consistency head (variant=regression|consistency)"),
    "bench-latency": ("robodistill.inference.latency", "per sampler: denoiser calls, latency p50/p99 at batch 1, success with intervals, a PNG"),
    "rpd": ("robodistill.training.rpd", "RPD: a PPO student (SB3) pulled toward a teacher's actions (teacher=<ckpt|bundle|ws://...|none>)"),
    "rl100": ("robodistill.training.rl100", "RL-100: imitation, OPE-gated offline PPO over the denoising chain, online PPO, one-step head; a stage report"),
    "export": ("robodistill.deploy.export", "a deploy bundle: one ONNX/TorchScript graph with normalisation inside, metadata.json, parity-checked"),
    "serve": ("robodistill.deploy.server", "serve a bundle over openpi's websocket protocol (openpi_client.WebsocketClientPolicy works unchanged)"),
    "control": ("robodistill.deploy.controller", "closed loop at a fixed rate through a policy server (bundle= or server=ws://...): success, jitter, deadline misses, latency"),
    "agv-train": ("robodistill.training.ppo_rnd", "PPO or PPO + RND on the AGV warehouse (scene=, algo=ppo_rnd|ppo, total_steps=); policy.pt for eval"),
    "dataset": ("robodistill.data.info", "`dataset info PATH`: episodes, lengths, success, shapes, modes, a PNG of action ranges"),
    "plot": ("robodistill.curves", "`plot RUN [RUN ...] [--out PNG]`: training runs' success curves (95% bands) side by side"),
    "summary": ("robodistill.summary", "`summary [--runs runs] [--name NAME]`: one table, the newest run of each command and every eval"),
}
ARGV_COMMANDS = {"dataset", "summary", "plot"}
TRAINING = ("train-teacher", "train-vla", "distill", "rpd", "rl100", "agv-train")  # each continues with resume=true
CHECKPOINT_NAMES = ("last.pt", "last.zip", "state.pt")  # what they continue from (rl100: a stage's state.pt)

USAGE = """usage: robodistill <command> [key=value ...] [--help]

commands:
{commands}

`robodistill <command> --help` shows the command's config and its defaults.
Example: robodistill eval env=PushCube-v1 policy=random episodes=10 seed=0 video=true"""


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return USAGE.format(commands="\n".join(lines))


def _command_help(command: str, overrides: list[str]) -> str:
    """The command's config with its defaults (and the overrides given), and the env options where it
    has an env; hydra's own help would also list groups the command does not have."""
    from omegaconf import OmegaConf

    cfg = compose_checked(command, precheckable(overrides) or [])
    lines = [f"usage: robodistill {command} [key=value ...]  (hydra overrides; `robodistill --help` lists the commands)",
             COMMANDS[command][1], ""]
    if "env" in cfg:
        lines += ["Config groups (choose with group=option):", f"env: {', '.join(group_options('env'))}", ""]
    lines += ["Config, with defaults:", OmegaConf.to_yaml(cfg).rstrip(), "",
              "Runs go to runs/<command>/<time>-<name>/ with the resolved config in .hydra/config.yaml."]
    return "\n".join(lines)


# Flags after which the package's configs (and the user's --config-dir) do not compose what hydra will: another
# primary config.
NOT_PRECHECKED = ("-cp", "--config-path", "-cn", "--config-name")


def precheckable(args: list[str]) -> list[str] | None:
    """The overrides among `args` (not hydra's flags such as `--cfg job`, nor the launcher's keys) when the
    package's configs compose the run as hydra will, with the user's --config-dir on the search path as hydra puts
    it; None when they do not (see NOT_PRECHECKED)."""
    if any(a.split("=", 1)[0] in NOT_PRECHECKED for a in args):
        return None
    plain = [a for a in args if ("=" in a or a.startswith("~")) and not a.startswith("-") and a.split("=", 1)[0] not in LAUNCH_KEYS]
    dirs = [f"file://{Path(d).absolute()}" for d in config_dirs(args)]
    return plain + [f"hydra.searchpath=[{','.join(dirs)}]"] if dirs else plain


def sweep_settings(overrides: list[str]) -> list[list[str]]:
    """A sweep's (-m) overrides once per value of each swept key, the other keys at their first value: each value the
    sweep will run, composed before its first job, is one line when bad, not hydra's many after the jobs before it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException:  # composing them says which, in one line
        return [overrides]
    values = [list(o.sweep_string_iterator()) if o.is_sweep_override() else [] for o in parsed]
    first = [f"{o.get_key_element()}={v[0]}" if v else o.input_line for o, v in zip(parsed, values)]
    return [first] + [[*first[:i], f"{o.get_key_element()}={value}", *first[i + 1:]]
                      for i, (o, v) in enumerate(zip(parsed, values)) for value in v[1:]]


def named_as_resumed(command: str, args: list[str]) -> list[str]:
    """`args`, plus the name of the run that `resume_from=` continues where they give no name=: the new run
    directory is named after it, not after the command line's defaults (another task's, another scene's), so that a
    later resume=true of that name finds the newest run and not the older one."""
    given = dict(a.split("=", 1) for a in args if "=" in a and not a.startswith("-"))
    if command not in TRAINING or not given.get("resume_from") or "name" in given:
        return args
    path = Path(given["resume_from"])
    run = path if path.is_dir() else path.parent.parent  # <run>/checkpoints/last.pt
    named = re.match(RUN_STAMP, run.name)
    return [*args, f"name={run.name[named.end():]}"] if named else args


def _is_submitit_job() -> bool:
    """This process is a submitit job (`python -m submitit.core._submit`), not a command or rank it started, which
    inherit its environment and say their line as any command does."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    return spec is not None and spec.name == "submitit.core._submit"


def _guarded(task_fn, command: str = ""):
    """Bad input ends in one clear line, not a traceback through hydra; so does Ctrl-C."""

    def how_it_continues(cfg: DictConfig) -> str:
        """What a stopped training run leaves to continue from: its own checkpoints, or the run it resumed."""
        if command not in TRAINING:
            return ""
        run_dir = _run_dir()
        saved = run_dir is not None and any(next(run_dir.rglob(name), None) for name in CHECKPOINT_NAMES)
        if cfg.get("resume_from") and command != "rl100":  # the same command would start again from resume_from's checkpoint
            return f": the run keeps its last checkpoint; resume=true name={cfg.get('name')} in place of resume_from= continues it"
        if saved or cfg.get("resume"):
            return ": the run keeps its last checkpoint; the same command with resume=true continues it"
        return ": it stopped before its first checkpoint, so there is nothing to resume; the same command starts it again"

    def interrupted(cfg: DictConfig, said: str = ""):
        """`said`: what the command itself says of how it stopped (control: the robot's stop action, the run kept)."""
        end_progress_bars()
        print("interrupted" + (f": {said}" if said else how_it_continues(cfg)), file=sys.stderr)
        drop_empty_run_dir()
        sys.exit(130)

    def run(cfg: DictConfig):
        try:
            return task_fn(cfg)
        except UserError as err:
            end_progress_bars()
            line = f"error: {err}{how_it_continues(cfg) if isinstance(err, CutShort) else ''}"
            print(line, file=sys.stderr)
            drop_empty_run_dir()
            if _is_submitit_job():  # an exit leaves no result, which its launcher waits 15 s for
                raise UserError(f"\n{line}") from None  # handed back to the launcher as the job's result, said below
            sys.exit(2)
        except KeyboardInterrupt as err:
            interrupted(cfg, str(err))
        except Exception:
            # The interrupt can land while pybind11 converts a call's arguments (SAPIEN, ManiSkill's kinematics),
            # which reports it as a TypeError ("incompatible function arguments"): after a signal, any error is it.
            if not _signals:
                raise
            interrupted(cfg)

    return run


def _common_hydra() -> list[str]:
    """configs/common.yaml's hydra settings (where runs go, console-only logging) as overrides, for a primary config
    that does not include common (a run's .hydra/config.yaml holds its fields only)."""
    from importlib.resources import files

    from omegaconf import OmegaConf

    def leaves(node, path: str):
        if isinstance(node, dict):
            return [o for key, value in node.items() for o in leaves(value, f"{path}.{key}")]
        if isinstance(node, list):
            return [f"{path}=[{','.join(map(str, node))}]"]
        return [f"{path}={str(node).lower()}" if isinstance(node, bool) else f"{path}='{node}'"]

    common = OmegaConf.load(files("robodistill.configs").joinpath("common.yaml"))
    return [f"++{o}" for o in leaves(OmegaConf.to_container(common.hydra), "hydra")]  # ++: set, or add (file.delay)


def _typed(command: str, task_fn):
    """A config that another primary config composed (--config-name: a run's saved .hydra/config.yaml, a file of the
    user's) typed by the command's schema, as the package's own configs are: else `episodes=abc` was a TypeError
    deep in the command, `video=maybe` a video recorded, and a misspelt field in the file ignored."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from robodistill.configs import schema

    def run(cfg: DictConfig):
        try:
            cfg = OmegaConf.merge(OmegaConf.structured(schema(command)), cfg)
        except OmegaConfBaseException as err:
            value = OmegaConf.select(cfg, err.full_key, default=None, throw_on_missing=False) if err.full_key else None
            raise UserError(f"{err.full_key}={value}: {str(err).splitlines()[0]}" if err.full_key and value is not None else
                            f"{err.full_key}: {str(err).splitlines()[0]}") from None
        return task_fn(cfg)

    return run


def end_progress_bars() -> None:
    """Close the progress bars still open, so that the line said next starts a line of its own, not the end of a bar's."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _run_dir() -> Path | None:
    """The run's directory; None before hydra made one, or under `--cfg job`, which makes none."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    output_dir = OmegaConf.select(HydraConfig.get(), "runtime.output_dir", default=None) if HydraConfig.initialized() else None
    return None if output_dir is None else Path(output_dir)


def drop_empty_run_dir() -> None:
    """A run that wrote nothing (stopped first, or one that went on in an earlier run's directory) holds only
    hydra's own files: remove it, so that `summary` and `resume=true` never take it for a run."""
    run_dir = _run_dir()
    if run_dir is None:
        return
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {".hydra"}:
        shutil.rmtree(run_dir)
        if {p.name for p in run_dir.parent.iterdir()} == {"multirun.yaml"}:  # a sweep that stopped in its first job
            run_dir = run_dir.parent
            shutil.rmtree(run_dir)
        command_dir = run_dir.parent  # runs/<command>, where the run has the default layout's name: hydra made it for the run
        if re.match(RUN_STAMP, run_dir.name) and not any(command_dir.iterdir()):
            command_dir.rmdir()


# A progress bar's every redraw stays in a log file or CI's log as a line of its own, and tqdm redraws up to ten times a
# second: thousands of lines in a training run. Where stderr is not a terminal, bars are redrawn this often (seconds).
LOG_REDRAW_SECONDS = 30

_signals: list[int] = []  # those received (a list: submitit's launcher pickles what a command's function refers to)


def _terminated(signum, frame) -> None:
    _signals.append(signum)
    raise KeyboardInterrupt  # `kill`, `timeout` or a scheduler's preemption ends a command as Ctrl-C does: cleaned up


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)
        signal.signal(signal.SIGINT, _terminated)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return
    command, overrides = argv[0], argv[1:]
    if not sys.stderr.isatty():  # tqdm reads it when imported: by the command's modules here, by torchrun's ranks and sweeps' jobs
        os.environ.setdefault("TQDM_MININTERVAL", str(LOG_REDRAW_SECONDS))
    if command not in COMMANDS:
        print(f"error: unknown command '{command}'.\n\n{_usage()}", file=sys.stderr)
        sys.exit(2)
    from robodistill.launcher import launch

    if command not in ARGV_COMMANDS:
        overrides = named_as_resumed(command, overrides)
        _guarded(lambda args: check_overrides(command, args))(overrides)
        register_schemas(command)
        plain = precheckable(overrides)
        if plain is not None and not {"-h", "--help"} & set(overrides):  # hydra would say the same in many lines
            sweep = {"-m", "--multirun", "hydra.mode=MULTIRUN"} & set(overrides)
            for setting in sweep_settings(plain) if sweep else [plain]:
                _guarded(lambda args: compose_checked(command, args))(setting)
    _guarded(lambda args: launch(command, args))(overrides)  # launcher=torchrun: re-run on N ranks
    module = importlib.import_module(COMMANDS[command][0])
    if command in ARGV_COMMANDS:
        return _guarded(module.main)(overrides)
    if "-h" in overrides or "--help" in overrides:
        print(_guarded(lambda args: _command_help(command, args))(overrides))
        return
    # hydra.job.name names the run's directory runs/<command>/ (configs/common.yaml) whatever the primary config is
    ours = [f"hydra.job.name={command}"]
    primary = any(a.split("=", 1)[0] in ("-cn", "--config-name", "-cp", "--config-path") for a in overrides)
    if primary:  # a config without the command's defaults (a run's saved .hydra/config.yaml) has no hydra section of ours
        given = {a.split("=", 1)[0].lstrip("+") for a in overrides}
        ours += [o for o in _common_hydra() if o.split("=", 1)[0].lstrip("+") not in given]
    # beside the overrides given: hydra's argparse takes its overrides as one run of words (not some after `--cfg job`)
    at = next((i for i, a in enumerate(overrides) if not a.startswith("-") and ("=" in a or a.startswith("~"))), len(overrides))
    sys.argv = [f"robodistill {command}", *overrides[:at], *ours, *overrides[at:]]
    task = _typed(command, module.main) if primary else module.main
    entry = hydra.main(config_path="pkg://robodistill.configs", config_name=command, version_base="1.3")(_guarded(task, command))
    if not any(o.startswith("hydra/launcher=submitit") for o in overrides):
        return entry()
    # A submitit job runs in a process of its own: its one line reaches this one inside the launcher's exception,
    # which hydra would print as a traceback. HYDRA_FULL_ERROR lets the exception through, to say the job's line.
    # A job that stopped on bad input hands its UserError back as its result, which hydra re-raises after writing
    # "Error executing job with overrides" to stderr: held back here, since the job's own line says more.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            entry()
    except Exception as err:
        said = list(dict.fromkeys(line.strip() for line in str(err).splitlines() if line.strip().startswith("error: ")))
        if not (type(err).__module__.startswith("submitit") or isinstance(err, UserError)) or not said:
            sys.stderr.write(held.getvalue())
            raise
        print("\n".join(said), file=sys.stderr)
        sys.exit(2)
    sys.stderr.write(held.getvalue())


if __name__ == "__main__":
    main()
