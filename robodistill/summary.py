"""`robodistill summary [--runs runs] [--name NAME]`: one table, the newest run of each command and every eval.

Every eval run is listed (e.g. the teacher's and the scripted expert's side by side).

Reads what the runs wrote (demos.json, metrics.jsonl, history.json, report.json, result.json,
eval.json, latency.json, export.json, control.json), so it can be run at any time; `make demo` ends
with it. A sweep (`-m`) gives a row per job. `--name` keeps runs whose directory ends with
`-<name>` (or `-<name>-...`), e.g. the demo's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from robodistill.errors import UserError

RUN_STAMP = r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d-"  # a run directory is <time>-<name> (configs/common.yaml)


def counted(n: int, noun: str) -> str:
    """`1 episode`, `2 episodes`."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def sampler_words(name: str, steps: int, timesteps: list[int] | None = None) -> str:
    """How a policy makes its actions: `ddim 10 steps`, `consistency 1 step`, `rti 3 steps [3, 1, 0]` (which
    steps: RTI's tail of the training timesteps is chosen, not implied by its count), or `mean action` (a
    Gaussian student's or AGV policy's, which has no sampler)."""
    if name == "mean":
        return "mean action"
    return f"{name} {counted(steps, 'step')}" + (f" {list(timesteps)}" if timesteps is not None else "")


def _rate(s: dict, key: str = "success_once") -> str:
    r = s[key]
    return f"{r['rate']:.0%} [{r['ci95'][0]:.0%}, {r['ci95'][1]:.0%}] ({r['count']}/{s['episodes']})"


def _ci(rate: float, ci: list[float]) -> str:
    return f"{rate:.0%} [{ci[0]:.0%}, {ci[1]:.0%}]"


def _demos(run: Path) -> list[str]:
    d = json.loads((run / "demos.json").read_text())
    return [f"{d['converted']}/{d['requested']} {d['task']} demonstrations (failed plans: {d['failed_plans']}): {d['path']}"]


def jsonl_rows(path: Path) -> list[dict]:
    """The rows of a .jsonl that a run appends to (metrics.jsonl), without a last line that has no newline yet:
    one being written as it is read, or cut short by a kill."""
    *complete, _unfinished = path.read_text().split("\n")
    return [json.loads(line) for line in complete if line.strip()]


def _teacher(run: Path) -> list[str]:
    rows = jsonl_rows(run / "metrics.jsonl")
    last = rows[-1]
    rated = f", success_once {_ci(last['success_once'], last['ci95'])}" if "success_once" in last else ""  # eval_episodes > 0
    return [f"{last['step']} iterations in {last['train_seconds'] / 60:.1f} min, loss {last['loss']:.4f}{rated}"]


def _policy(spec: str) -> str:
    """A policy as the table names it: a file under runs/ by its command and run (runs/rpd/<run>/student.zip ->
    rpd/<run>/student.zip, checkpoints/ left out), anything else as given."""
    parts = Path(spec).parts
    if "runs" not in parts:
        return spec
    return "/".join(p for p in parts[len(parts) - parts[::-1].index("runs"):] if p != "checkpoints")


def _eval(run: Path) -> list[str]:
    e = json.loads((run / "eval.json").read_text())
    s, sampler = e["summary"], e.get("sampler")
    # the rates an env reports: ManiSkill's success_at_end, the AGV's collision
    rates = ", ".join(f"{k} {_rate(s, k)}" for k in ("success_once", "success_at_end", "collision") if k in s)
    used = f", {sampler_words(sampler['name'], sampler['steps'], sampler.get('timesteps'))}" if sampler else ""
    return [f"{rates} ({_policy(str(e['policy']))}{used})"]


def _vla(run: Path) -> list[str]:
    rows = jsonl_rows(run / "metrics.jsonl")
    last = rows[-1]
    tasks = ", ".join(f"{t} {_ci(r['success_once'], r['ci95'])}" for t, r in last.get("tasks", {}).items())
    return [f"{last['step']} iterations in {last['train_seconds'] / 60:.1f} min" + (f"; success_once {tasks}" if tasks else "")]


def _rpd(run: Path) -> list[str]:
    last = json.loads((run / "history.json").read_text())[-1]
    return [f"{last['step']} env steps, success_once {_ci(last['success_once'], last['ci95'])} ({last['episodes']} ep), "
            f"{last['train_steps_per_second']:.0f} training env steps/s"]


def _rl100(run: Path) -> list[str]:
    stages = json.loads((run / "report.json").read_text())["stages"]
    done = [k for k in ("init", "imitation", "offline", "online", "distill") if k in stages]
    if not done:
        raise KeyError("no stage finished")
    return [", ".join(f"{k} {_ci(stages[k]['success_once'], stages[k]['ci95'])}" for k in done)]


def _agv(run: Path) -> list[str]:
    last = json.loads((run / "history.json").read_text())[-1]
    return [f"{last['step']} env steps, success {_ci(last['success'], last['success_ci95'])}, collision {last['collision']:.0%}"]


def _distill(run: Path) -> list[str]:
    r = json.loads((run / "result.json").read_text())
    rated = f", 1 step: success_once {_rate(r['consistency_1'])}" if "consistency_1" in r else ""  # eval_episodes > 0
    return [f"{r['variant']} head: {r['step']} iterations in {r['train_seconds'] / 60:.1f} min{rated}"]


def _latency(run: Path) -> list[str]:
    # a row has no success where the run measured latency only (episodes=0)
    return [f"{r['sampler']:<14} {counted(r['denoiser_calls'], 'call'):>9}, p50 {r['p50_ms']:7.2f} ms"
            + (f", success_once {_ci(r['success_once'], r['ci95'])} ({r['episodes']} ep)" if "success_once" in r else "")
            for r in json.loads((run / "latency.json").read_text())]


def _export(run: Path) -> list[str]:
    e = json.loads((run / "export.json").read_text())
    m = e["metadata"]
    return [f"{m['graph']['format']} bundle, {sampler_words(m['policy']['sampler'], m['policy']['steps'])}, "
            f"parity {m['parity']['max_abs_diff']:.1e}: {e['bundle']}"]


def kept_hz(timing: dict) -> float | None:
    """The rate a paced control loop (its control.json `timing`) kept where it fell short of its hz=: a robot step
    slower than a period stretches every period (the loop only sleeps what one leaves). None where it kept hz=."""
    period = timing["period_ms_p50_p99"][0]
    return 1e3 / period if timing["hz"] > 0 and period > 1.1e3 / timing["hz"] else None


def _control(run: Path) -> list[str]:
    c = json.loads((run / "control.json").read_text())
    t = c["timing"]
    jitter = f"jitter p99 {t['jitter_ms_p50_p99_max'][1]:.1f} ms, " if "jitter_ms_p50_p99_max" in t else ""
    outcome = f"success_once {_rate(c['summary'])}" if c["summary"]["episodes"] else "no episode finished"
    kept = kept_hz(t)
    pace = "unpaced (hz=0)" if not t["hz"] else f"at {t['hz']:g} Hz" + (f" (it kept {kept:.0f} Hz)" if kept else "")
    lines = [f"{outcome} through the server {pace}",
             f"{jitter}{t['late_steps']}/{t['steps']} deadline misses, round trip p50 {t['round_trip_ms_p50_p99'][0]:.1f} ms"]
    return lines + ([f"stopped early: {c['stopped']}"] if c.get("stopped") else [])


# command -> what its run directory says, in pipeline order
READERS = {"demos": _demos, "train-teacher": _teacher, "train-vla": _vla, "eval": _eval, "distill": _distill,
           "bench-latency": _latency, "rpd": _rpd, "rl100": _rl100, "agv-train": _agv, "export": _export, "control": _control}


def jobs(run: Path) -> list[tuple[str, Path]]:
    """A sweep's directory (`-m`) holds one job per numbered folder; a plain run is one job."""
    if (run / ".hydra").is_dir():
        return [(run.name, run)]
    jobs = sorted((q for q in run.iterdir() if q.is_dir() and q.name.isdigit()), key=lambda q: int(q.name))
    return [(f"{run.name}/{q.name}", q) for q in jobs] or [(run.name, run)]


def sweep_labelled(run: Path) -> list[tuple[str, Path]]:
    """`jobs`, a sweep's labelled with the overrides its jobs differ in (`<time>-multirun/1 seed=1 algo=ppo`), as `plot` labels them."""
    from robodistill.curves import labels

    found = jobs(run)
    if len(found) < 2:
        return found
    return [(label if mine == label else f"{label} {mine}", job) for (label, job), mine in zip(found, labels(found))]


def named(job: Path, name: str) -> bool:
    """A run's directory ends -NAME (eval's may go on: -NAME-<task>); a sweep's job, <time>-multirun/<n>, is named by
    the config it ran with (resolved: a default name is an interpolation such as ${algo}-${scene})."""
    if job.name.endswith(f"-{name}") or f"-{name}-" in job.name:
        return True
    config = job / ".hydra" / "config.yaml"
    if not config.is_file():
        return False
    from robodistill.configs import register_resolvers

    register_resolvers()
    try:
        return OmegaConf.select(OmegaConf.load(config), "name", default=None) == name
    except (yaml.YAMLError, OmegaConfBaseException):  # not a config of ours, or a name needing hydra's own resolvers
        return False


def summarize(runs: Path, name: str | None = None) -> list[tuple[str, str, str]]:
    """(command, run directory name, one line of result) rows, newest run of each command."""
    rows = []
    for command, read in READERS.items():
        # Not one holding only hydra's config: a run killed (kill -9) or crashed before it wrote anything, as the one an
        # rl100 resume=true makes while it goes on in the earlier run's directory; the newest would hide the run before it.
        found = sorted(p for p in (runs / command).glob("*") if p.is_dir() and {q.name for q in p.iterdir()} - {".hydra"}) if (runs / command).is_dir() else []
        if name:
            found = [p for p in found if any(named(job, name) for _, job in jobs(p))]
        # Every eval run of the name (e.g. the teacher's and the scripted expert's), else the newest.
        chosen = found if command == "eval" else found[-1:]
        for label, run in (job for run in chosen for job in sweep_labelled(run) if not name or named(job[1], name)):
            try:
                lines = read(run)
            except (OSError, KeyError, json.JSONDecodeError, IndexError, TypeError, ValueError):  # a run that died, or a foreign file
                lines = ["(incomplete run)"]
            rows += [(command, label, line) for line in lines]
    return rows


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="robodistill summary", description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=Path, default=Path("runs"), help="the runs directory (default: runs)")
    ap.add_argument("--name", help="only runs named NAME (name=NAME: a directory ending -NAME or containing -NAME-, "
                                   "a sweep's jobs by their config)")
    a = ap.parse_args(argv)
    if not a.runs.is_dir():
        raise UserError(f"--runs {a.runs} is not a directory: run a command first, or point --runs at its runs/")
    rows = summarize(a.runs, a.name)
    if not rows:
        raise UserError(f"no runs{' named ' + a.name if a.name else ''} under {a.runs}")
    w1, w2 = max(len(r[0]) for r in [("command", "run"), *rows]), max(len(r[1]) for r in [("command", "run"), *rows])
    print(f"{'command':<{w1}}  {'run':<{w2}}  result")
    print(f"{'-' * w1}  {'-' * w2}  {'-' * 6}")
    for command, run, line in rows:
        print(f"{command:<{w1}}  {run:<{w2}}  {line}")
