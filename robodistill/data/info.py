"""`robodistill dataset info PATH [--plot PNG]`: what a trajectory file holds, and its action ranges."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from robodistill.curves import save_figure
from robodistill.data.trajectories import Episode, open_trajectory
from robodistill.errors import UserError


def describe(path: str | Path) -> tuple[dict, list[Episode]]:
    traj = open_trajectory(path)
    try:
        episodes = traj.episodes(need_obs=False, in_memory=False)  # images: their shapes only, not every frame
        lengths = np.array([len(e) for e in episodes])
        successes = [e.success for e in episodes if e.success is not None]
        summary = {
            "file": str(traj.path),
            "env_id": traj.env_id,
            "control_mode": traj.control_mode,
            "obs_mode": traj.obs_mode,
            "source": traj.meta.get("source_type"),
            "episodes": len(episodes),
            "successful": sum(map(bool, successes)) if successes else None,
            "length": {"mean": float(lengths.mean()), "min": int(lengths.min()), "max": int(lengths.max()), "total": int(lengths.sum())},
            "observations": {k: {"shape": list(v.shape[1:]), "dtype": str(v.dtype)} for k, v in episodes[0].obs.items()},
            "actions": {"shape": list(episodes[0].actions.shape[1:]), "dtype": str(episodes[0].actions.dtype)},
            "env_kwargs": traj.env_kwargs,
        }
    finally:
        traj.close()
    return summary, episodes


def plot_action_ranges(episodes: list[Episode], title: str, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    actions = np.concatenate([e.actions for e in episodes])
    fig, ax = plt.subplots(figsize=(max(4, 0.9 * actions.shape[1] + 2), 3.5))
    ax.boxplot([actions[:, d] for d in range(actions.shape[1])], whis=(0, 100))
    ax.set_xlabel("action dimension")
    ax.set_xticks(range(1, actions.shape[1] + 1), [str(d) for d in range(actions.shape[1])])
    ax.set_ylabel("value (whiskers: min and max)")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, out, dpi=100)


def format_summary(s: dict) -> str:
    ok = "unknown" if s["successful"] is None else f"{s['successful']} successful ({s['successful'] / s['episodes']:.0%})"
    obs = ", ".join(f"{k} {tuple(v['shape'])} {v['dtype']}" for k, v in s["observations"].items()) or (
        "none: actions only (raw plans; replay_trajectory converts them, see the README's demonstrations)")
    return "\n".join([
        f"file          {s['file']}",
        f"env           {s['env_id']}   control_mode={s['control_mode']}   obs_mode={s['obs_mode']}   source={s['source'] or 'not recorded'}",
        f"episodes      {s['episodes']}, {ok}",
        f"length        mean {s['length']['mean']:.1f}, min {s['length']['min']}, max {s['length']['max']}, {s['length']['total']} steps in all",
        f"observations  {obs}",
        f"actions       {tuple(s['actions']['shape'])} {s['actions']['dtype']}",
        f"env kwargs    {s['env_kwargs']}",
    ])


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="robodistill dataset", description="Inspect ManiSkill trajectory files.")
    sub = parser.add_subparsers(dest="action", required=True)
    info = sub.add_parser("info", help="episodes, lengths, success, shapes, modes, env kwargs, and a PNG of action ranges")
    info.add_argument("path", help="trajectory .h5 (its .json must sit next to it)")
    info.add_argument("--plot", help="PNG of action ranges (default: <path stem>.actions.png next to the file)")
    args = parser.parse_args(argv)
    if args.plot and Path(args.plot).suffix.lower() != ".png":  # matplotlib would add .png or refuse the format
        raise UserError(f"--plot {args.plot}: give a .png path (the plot is a PNG)")
    summary, episodes = describe(args.path)
    print(format_summary(summary))  # first: a plot that cannot be written leaves the summary said
    out = Path(args.plot) if args.plot else Path(summary["file"]).with_suffix(".actions.png")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        plot_action_ranges(episodes, f"{summary['env_id']} {summary['control_mode']}: {summary['episodes']} episodes", out)
    except OSError as err:  # a file on its path, no permission, a read-only dataset folder (the default sits beside the .h5)
        raise UserError(f"cannot write the plot {out} ({err.strerror}: {err.filename}): give --plot <a .png path you can write>") from err
    print(f"plot          {out}")
