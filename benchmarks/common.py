"""What the benchmark scripts share: their flags' checks, and bad input said in one line, as the CLI says it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

from robodistill import checkpoints
from robodistill.envs.factory import check_task
from robodistill.errors import UserError
from robodistill.training.runs import budget_spent


RD = [sys.executable, "-m", "robodistill.cli"]  # how the scripts run a `robodistill` command as a child


def settings(cmd: list) -> dict:
    """What makes a `robodistill` run ([*RD, command, overrides...]): its overrides, less where it goes and how it continues."""
    pairs = (str(c).split("=", 1) for c in cmd[len(RD) + 1:])
    return {key: value for key, value in pairs if key not in ("hydra.run.dir", "resume_from")}


def trained(ckpt: Path, cmd: list) -> bool:
    """Whether the training command `cmd` (train-teacher, train-vla) that wrote `ckpt` used up its iterations= or
    minutes=: a run killed part way leaves a last.pt too, and is continued (resume_from), not reported as finished."""
    given = settings(cmd)
    state = checkpoints.load(ckpt)
    minutes = None if given.get("minutes", "null") == "null" else float(given["minutes"])
    return budget_spent(state["step"], int(given["iterations"]), state["train_seconds"], minutes)


def absolute(path: str) -> Path:
    """argparse type of every path flag: a path is recorded in a run's bench-settings.json and printed, so it
    must name the same file wherever the script is started from. (The `robodistill` children run in the user's
    directory, so a relative path in pass-through overrides means what it would on the command line.)"""
    return Path(path).expanduser().resolve()


def guarded(main: Callable[[], None]) -> None:
    """Run a benchmark's main: a mistake the user can fix ends in one line and status 2, not a traceback."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def check_child(cmd: list, code: int, log: Path) -> None:
    """A `robodistill` child that refused its input (status 2 and an `error:` line, e.g. a bad pass-through
    override) ends the script with that line, as the CLI would say it; any other failure is a crash, with the
    log's tail."""
    if code == 0:
        return
    text = log.read_text()
    said = [line for line in text.splitlines() if line.startswith("error: ")]
    if code == 2 and said:
        raise UserError(f"{said[-1].removeprefix('error: ')} (log: {log})")
    raise RuntimeError(f"failed ({code}): {' '.join(map(str, cmd))}\n{text[-3000:]}")


def at_least(flag: str, value: float, least: float = 1) -> None:
    if value < least:
        raise UserError(f"{flag} must be >= {least}, got {value}")


def counts(args: argparse.Namespace, *flags: str) -> None:
    """Flags that count something (steps, episodes, repeats): each >= 1."""
    for flag in flags:
        at_least(flag, getattr(args, flag[2:].replace("-", "_")))


def distinct(flag: str, values: list) -> None:
    """Seeds and the like are pooled: one given twice would count its runs twice, a falsely narrow interval."""
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise UserError(f"{flag} gives {', '.join(map(str, repeated))} more than once: give each once")


def same_settings(run_dir: Path, settings: dict, made: bool) -> None:
    """A run is reused or continued only with the settings it was made with, which the tables then claim:
    a run about to be made records them in run_dir/bench-settings.json, a made one is checked against them."""
    path = run_dir / "bench-settings.json"
    settings = json.loads(json.dumps(settings))  # as they read back (tuples as lists)
    if not made:
        run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=2))
        return
    if not path.is_file():
        raise UserError(f"{run_dir} holds a run made without recorded settings: use another --out (or delete {run_dir})")
    recorded = json.loads(path.read_text())
    for key in {**recorded, **settings}:
        if recorded.get(key) != settings.get(key):
            raise UserError(f"{run_dir} holds a run made with {key}={recorded.get(key)}, not {key}={settings.get(key)}: "
                            f"use another --out (or delete {run_dir})")


def check_tasks(flag: str, tasks: list[str]) -> None:
    """Before any work: the check `robodistill` makes of env.task, naming the script's flag."""
    for task in tasks:
        check_task(task, flag)
