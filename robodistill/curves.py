"""`robodistill plot RUN [RUN ...] [--out curves.png]`: training curves of runs side by side.

Success (with its 95% Wilson interval as a band) against training progress, one line per run (a VLA run: one
per task), above the loss (train-teacher, train-vla) or the evaluation return (rpd, agv-train). Reads what
the runs wrote (metrics.jsonl, history.json) at any time, so a run still training plots as far as it got;
a sweep's directory (`-m`) stands for its jobs. Every training run with evaluations also writes its own
curves.png when it ends.
"""

from __future__ import annotations

import argparse
import json
import re
import textwrap
from pathlib import Path

from robodistill import checkpoints
from robodistill.errors import UserError
from robodistill.summary import RUN_STAMP, jobs, jsonl_rows

# the file a command's run records its evaluations in, and what its x axis counts
SOURCES = {"train-teacher": ("metrics.jsonl", "iterations"), "train-vla": ("metrics.jsonl", "iterations"),
           "rpd": ("history.json", "env steps"), "agv-train": ("history.json", "env steps")}


# the training commands whose runs plot does not draw, and what shows how their training went
DRAWN_ELSEWHERE = {"rl100": "it draws its own: each stage's success in report.md, the online stage in online.png, the "
                            "offline gate's decisions in ope.png",
                   "distill": "it evaluates once, when it ends (result.json; `robodistill summary` shows it)"}


def _command(run: Path) -> str:
    """The command that made `run`: runs/<command>/<run> (or <run>/<job> of a sweep), else its files' config."""
    config = run / ".hydra" / "hydra.yaml"
    found = re.search(r"config_name: (\S+)", config.read_text()) if config.is_file() else None
    for part in (run.parent.name, run.parent.parent.name, found.group(1) if found else None):
        if part in SOURCES:
            return part
        if part in DRAWN_ELSEWHERE:
            raise UserError(f"{run} is a run of {part}, which plot does not draw: {DRAWN_ELSEWHERE[part]}")
    raise UserError(f"{run} is not the run directory of a training command with evaluations "
                    f"({', '.join(SOURCES)}): give runs/<command>/<run>")


def _rows(run: Path, command: str) -> list[dict]:
    path = run / SOURCES[command][0]
    if not path.is_file():  # not evaluated yet
        return []
    try:
        return jsonl_rows(path) if path.suffix == ".jsonl" else json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is damaged ({err}): leave {run} out of the plot") from None


def series(run: Path, label: str, command: str | None = None) -> tuple[str, dict[str, list[tuple[int, float, float, float]]], list[tuple[int, float]], str]:
    """(command, {label: [(x, success, ci low, ci high)]}, [(x, lower panel's value)], lower panel's name) of one
    run of `command` (None: found from the run), labelled `label`."""
    command = command or _command(run)
    rows = _rows(run, command)
    success: dict[str, list] = {}
    for r in rows:
        if command == "train-vla":
            for task, t in r.get("tasks", {}).items():
                success.setdefault(f"{label} {task}", []).append((r["step"], t["success_once"], *t["ci95"]))
        elif command == "agv-train":
            success.setdefault(label, []).append((r["step"], r["success"], *r["success_ci95"]))
        elif "success_once" in r:
            success.setdefault(label, []).append((r["step"], r["success_once"], *r["ci95"]))
    lower_key, lower_name = ("loss", "training loss") if command in ("train-teacher", "train-vla") else (
        ("mean_return", "evaluation return") if command == "agv-train" else ("return", "evaluation return"))
    lower = [(r["step"], r[lower_key]) for r in rows if r.get(lower_key) is not None]
    return command, success, lower, lower_name


# A legend line's characters at its font size (7 pt) that fit inside the 8-inch axes: a longer label (runs of one name
# told apart by a teacher's path and several settings) is wrapped, where matplotlib let the legend run off the figure's
# left edge and squeezed the axes to make room for it. Lines break between overrides, never inside a path at a hyphen.
LEGEND_CHARS = 90

# overrides that do not change what a run learns, left out of the labels that tell runs of one name apart
UNLABELLED = ("name", "resume", "resume_from", "progress", "threads", "hydra")


def _given(run: Path) -> list[str]:
    """The overrides a run's command line gave (its .hydra/overrides.yaml), in order."""
    import yaml

    path = run / ".hydra" / "overrides.yaml"
    given = yaml.safe_load(path.read_text()) if path.is_file() else None
    return [str(o) for o in given or [] if str(o).split("=", 1)[0].lstrip("+~").split(".")[0] not in UNLABELLED]


def labels(found: list[tuple[str, Path]]) -> list[str]:
    """A legend label per (directory label, run): the run's name, and where runs share it, the overrides they
    differ in (teacher=none vs teacher=x.pt; a sweep's seed=1), else (runs alike) their directory labels."""
    names = [re.sub("^" + RUN_STAMP, "", label).split("/")[0].removesuffix("multirun") for label, _ in found]
    given = [_given(run) for _, run in found]
    out = []
    for (label, _), name, mine in zip(found, names, given):
        twins = [set(g) for g, n in zip(given, names) if n == name]
        if len(twins) == 1:
            out.append(name)
            continue
        own = [o for o in mine if o not in set.intersection(*twins)]
        out.append(" ".join(([name] if name else []) + own) if own else label)
    return [mine if out.count(mine) == 1 else label for mine, (label, _) in zip(out, found)]


def plot(runs: list[Path], out: Path, command: str | None = None) -> Path:
    """One PNG of the runs' curves; the runs must count progress alike (iterations or env steps).
    `command`: the one that made them all (None: found from each run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for run in runs:
        if not run.is_dir():
            raise UserError(f"{run} is not a directory: give run directories, e.g. runs/rpd/<run>")
    found = [job for given in runs for job in jobs(given)]
    curves = [(run, *series(run, label, command)) for (_, run), label in zip(found, labels(found))]
    units = {SOURCES[c][1] for _, c, *_ in curves}
    if len(units) > 1:
        raise UserError(f"these runs count progress in {' and '.join(sorted(units))}: plot runs of one kind together "
                        "(train-teacher and train-vla; or rpd and agv-train)")
    for run in (run for run, _, s, _, _ in curves if not s):
        print(f"{run}: no evaluations yet, left out")
    curves = [c for c in curves if c[2]]
    if not curves:
        raise UserError(f"no evaluations in {', '.join(str(r) for r in runs)} yet (eval_episodes=0, or not evaluated so far)")
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    colour = 0
    for _, _, success, lower, lower_name in curves:
        first = colour
        for label, points in success.items():
            x, y, lo, hi = zip(*points)
            top.plot(x, y, "o-", ms=3, color=f"C{colour % 10}", label=textwrap.fill(label, LEGEND_CHARS, break_on_hyphens=False))
            if len(points) > 1:
                top.fill_between(x, lo, hi, color=f"C{colour % 10}", alpha=0.15, lw=0)
            else:  # a band through one point has no width: its interval as an error bar
                top.errorbar(x, y, yerr=[[y[0] - lo[0]], [hi[0] - y[0]]], fmt="none", ecolor=f"C{colour % 10}", capsize=4)
            colour += 1
        if lower:
            draw_line(bottom, lower, color=f"C{first % 10}", lw=1)
        bottom.set_ylabel(lower_name)
    # Close values (a flat loss) would be labelled as offsets from a corner note, 0 to 1 under "1e-6+2.34e-2": the values.
    bottom.ticklabel_format(axis="y", useOffset=False)
    top.set_ylabel("success (95% interval)")
    top.set_title(", ".join(sorted({c for _, c, *_ in curves})) + ": evaluation during training", fontsize=10)
    top.set_ylim(-0.02, 1.02)
    top.legend(fontsize=7, loc="best")
    bottom.set_xlabel(units.pop())
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        save_figure(fig, out, dpi=110)
    except OSError as err:  # a file on its path, no permission, a read-only disk
        raise UserError(f"cannot write {out} ({err.strerror}: {err.filename}): give --out <a path you can write>") from err
    return out


def save_figure(fig, path: Path, dpi: int) -> Path:
    """Write `fig` to `path` atomically and close it: a full disk ends the command in one line naming the file and
    keeps the figure that was there, never a cut-short PNG (see checkpoints.write_atomic)."""
    import matplotlib.pyplot as plt

    try:
        return checkpoints.write_atomic(path, lambda f: fig.savefig(f, format=Path(path).suffix[1:], dpi=dpi))
    finally:
        plt.close(fig)


def draw_line(ax, points: list[tuple[float, float]], **style) -> None:
    """`points` as a line; one point as a marker, which a line through it alone would not draw (a run's first update)."""
    ax.plot(*zip(*points), marker="o" if len(points) == 1 else None, ms=3, **style)


def write_run_curves(run_dir: Path, command: str) -> None:
    """A training run's own curves.png when it has evaluations; it says where."""
    if any(series(run_dir, run_dir.name, command)[1].values()):  # none with eval_episodes=0
        print(f"curves: {plot([run_dir], run_dir / 'curves.png', command)}")


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="robodistill plot", description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run directories: runs/<command>/<run> (a sweep's: its jobs)")
    ap.add_argument("--out", type=Path, default=Path("curves.png"), help="the PNG to write (default: curves.png)")
    a = ap.parse_args(argv)
    if a.out.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise UserError(f"--out {a.out}: give a .png, .pdf or .svg file")
    print(f"wrote {plot(a.runs, a.out)}")
