"""`robodistill demos`: successful demonstrations from ManiSkill's motion-planning solutions.

1. Plan: worker processes run ManiSkill's solver for the task (pd_joint_pos, no observations),
   recording with ManiSkill's `RecordEpisode`; a failed plan is dropped and the next seed tried.
   Worker w tries seeds seed + w, seed + w + workers, ...: the set of files is repeatable.
2. Convert each worker's file to the requested obs and control mode with ManiSkill's `replay_trajectory`
   (`--use-first-env-state`, a process per file), which keeps only episodes that still succeed.
3. Merge the workers' plans, and their converted files, into one each, episodes in seed order (whatever `workers`).
Everything is written in a temp folder next to the output and renamed into place at the end, so
an interrupted run leaves nothing half-written. Output (named by `robodistill.data.trajectories.demos_file`): `<out>/mp_n<n>_seed<seed>.<obs_mode>.<control_mode>.h5/.json`
(converted) and `<out>/mp_n<n>_seed<seed>.none.pd_joint_pos.h5/.json` (the plans, to convert to other modes later).
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.connection
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from multiprocessing.managers import SyncManager
from pathlib import Path

import h5py
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from robodistill.checkpoints import remove_orphaned
from robodistill.data.trajectories import demos_file
from robodistill.envs import EnvConfig, make_env
from robodistill.envs.vector import how_it_ended
from robodistill.errors import UserError


@dataclass
class DemosConfig:
    """`robodistill demos` (configs/demos.yaml)."""

    env: EnvConfig = field(default_factory=EnvConfig)  # task, obs_mode, control_mode, image_size are used
    n: int = 10  # successful demonstrations wanted
    workers: int = 2  # planning and conversion processes
    seed: int = 0  # first planning seed
    out: str | None = None  # output folder; default datasets/<task>
    max_failure_rate: float = 0.5  # give up when more plans than this fail
    name: str = "demos"


def solutions() -> dict:
    from mani_skill.examples.motionplanning.panda.run import MP_SOLUTIONS

    return MP_SOLUTIONS


def _plan_worker(task: str, seeds: list[int], quota: int, max_failures: int, out_dir: str, worker: int, image_size: int, progress) -> dict:
    """Plan until `quota` successes; returns the recorded file and what happened per seed."""
    import gymnasium as gym
    import torch
    from mani_skill.utils.wrappers.record import RecordEpisode

    torch.set_num_threads(1)
    env = gym.make(
        task, obs_mode="none", control_mode="pd_joint_pos", render_mode="rgb_array", sim_backend="physx_cpu",
        render_backend="cpu", sensor_configs=dict(width=image_size, height=image_size),
    )
    # no dot in the name: replay_trajectory names what it writes by the part before the first one
    env = RecordEpisode(
        env, output_dir=out_dir, trajectory_name=f"plan_{worker}", save_video=False, save_on_reset=False,
        source_type="motionplanning", source_desc="ManiSkill motion-planning solution, recorded by robodistill demos",
    )
    solve = solutions()[task]
    done, failed = [], []
    for seed in seeds:
        if len(done) == quota or len(failed) > max_failures:
            break
        try:
            result = solve(env, seed=seed, debug=False, vis=False)
        except Exception:  # the solver raises on unreachable poses; that is a failed plan
            result = -1
        ok = result != -1 and bool(result[-1]["success"].item())
        env.flush_trajectory(save=ok)
        (done if ok else failed).append(seed)
        progress.put(ok)
    path = str(env._h5_file.filename)
    env.close()
    return {"path": path, "seeds": done, "failed_seeds": failed}


def _end_with_parent() -> None:
    """The initializer of planning workers and their progress queue's process: each exits once the `demos` process is gone (kill -9, the out-of-memory
    killer), where it planned on, orphaned, for minutes, and then waited for work forever."""
    parent = multiprocessing.parent_process()

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _plan(cfg: DemosConfig, tmp: Path) -> tuple[list[Path], dict]:
    workers = min(cfg.workers, cfg.n)
    quotas = [cfg.n // workers + (w < cfg.n % workers) for w in range(workers)]
    max_failures = int(cfg.max_failure_rate * cfg.n / (1 - cfg.max_failure_rate)) + 2
    seed_lists = [[cfg.seed + w + k * workers for k in range(quotas[w] + max_failures + 1)] for w in range(workers)]
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn")
    # An executor, not multiprocessing.Pool: a Pool replaces a worker that dies (a crash in the simulator or the HDF5
    # writer, the out-of-memory killer) and leaves its job pending, so the command waited for it forever.
    manager = SyncManager(ctx=ctx)  # the progress queue's process, which ends with this one as the workers do
    manager.start(_end_with_parent)
    with manager, ProcessPoolExecutor(workers, mp_context=ctx, initializer=_end_with_parent) as pool:
        progress = manager.Queue()
        jobs = [
            pool.submit(_plan_worker, cfg.env.task, seed_lists[w], quotas[w], max_failures // workers + 1, str(tmp), w, cfg.env.image_size, progress)
            for w in range(workers)
        ]
        ok = fail = 0
        with tqdm(total=cfg.n, desc=f"planning {cfg.env.task}", unit="demo") as bar:
            while not all(j.done() for j in jobs) or not progress.empty():
                try:
                    success = progress.get(timeout=0.2)
                except Exception:
                    continue
                ok, fail = ok + success, fail + (not success)
                bar.update(int(success))
                bar.set_postfix(refresh=False, failed_plans=fail)
        try:
            results = [j.result() for j in jobs]
        except BrokenProcessPool as err:
            free = shutil.disk_usage(tmp).free / 2**30
            raise UserError(f"a planning worker process died after {ok} of {cfg.n} demos (a crash in the motion planner, the "
                            f"simulator or the HDF5 writer, or the out-of-memory killer; {free:.1f} GiB free where the demos "
                            f"are written, {tmp.parent}); nothing was kept: run it again, with fewer workers= if memory is short") from err
    seeds = sorted(s for r in results for s in r["seeds"])
    failed = sorted(s for r in results for s in r["failed_seeds"])
    if len(seeds) < cfg.n:
        raise UserError(f"the motion planner failed too often on {cfg.env.task}: {len(seeds)} successes, {len(failed)} failures (max_failure_rate={cfg.max_failure_rate})")
    return [Path(r["path"]) for r in results], {"seeds": seeds, "failed_seeds": failed}


def _merge_in_seed_order(out: Path, paths: list[Path]) -> None:
    """The workers' files as one, episodes in seed order and numbered 0, 1, ... in it. ManiSkill's
    `merge_trajectories` appends file after file, which ordered the episodes by worker (seeds 0, 2, 1, 3 with two):
    the same command with another `workers` wrote another file, and `num_demos=N` (the first N) took other demos."""
    metas = [json.loads(path.with_suffix(".json").read_text()) for path in paths]
    rows = sorted(((row["episode_seed"], path, row) for path, meta in zip(paths, metas) for row in meta["episodes"]),
                  key=lambda item: item[0])
    episodes = []
    try:
        with h5py.File(out, "w") as merged:
            for i, (_, path, row) in enumerate(rows):
                with h5py.File(path, "r") as part:
                    part.copy(f"traj_{row['episode_id']}", merged, f"traj_{i}")
                episodes.append({**row, "episode_id": i})
        out.with_suffix(".json").write_text(json.dumps({**metas[0], "episodes": episodes}, indent=2))
    except (OSError, RuntimeError) as err:  # h5py says a failed write in a RuntimeError of many lines
        said = re.search(r"error message = '([^']*)'", str(err))
        why = said.group(1) if said else str(err).splitlines()[0]
        free = shutil.disk_usage(out.parent).free / 2**30
        raise UserError(f"writing the demos into one file failed: {why}; {free:.1f} GiB free where the demos are written "
                        f"({out.parent.parent}); nothing was kept") from err


def _convert(cfg: DemosConfig, plans: list[Path]) -> list[Path]:
    """ManiSkill's own replay tool turns each worker's joint-position plans into the requested modes, one process per
    file. Not its --num-envs: its multiprocessing.Pool waits forever for a worker that dies (a full disk crashes HDF5 as
    it closes the file), where a process of ours that dies is seen."""
    obs_mode, control_mode = cfg.env.obs_mode, cfg.env.control_mode
    outs = [path.with_name(f"{path.stem}.{obs_mode}.{control_mode}.physx_cpu.h5") for path in plans]
    logs = [path.with_suffix(".log") for path in plans]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs: list[subprocess.Popen] = []
    try:
        for path, log in zip(plans, logs):
            with open(log, "w") as stderr:  # a file, not a pipe: its progress bar would fill a pipe no one reads yet
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "mani_skill.trajectory.replay_trajectory", "--traj-path", str(path),
                     "--use-first-env-state", "-c", control_mode, "-o", obs_mode, "--save-traj", "-b", "physx_cpu"],
                    stdout=subprocess.DEVNULL, stderr=stderr, env=env))
        while True:
            codes = [p.poll() for p in procs]
            failed = [i for i, code in enumerate(codes) if code is not None and (code != 0 or not outs[i].exists())]
            if failed:
                break
            if None not in codes:
                return outs
            time.sleep(0.2)
    finally:  # the others' work is lost with the failed one's (nothing is kept); Ctrl-C ends them too
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    code = procs[failed[0]].returncode
    # Its stderr is a traceback (often two, h5py's as it closes): its last exception line says what went wrong.
    raised = [line for line in logs[failed[0]].read_text().splitlines() if re.match(r"[\w.]*(Error|Exception)\b", line)]
    ended = how_it_ended(code) if code else "wrote no file"
    free = shutil.disk_usage(plans[0].parent).free / 2**30
    raise UserError(f"converting the plans to {obs_mode}/{control_mode} with ManiSkill's replay_trajectory failed: it {ended}"
                    f"{f' ({raised[-1][:300]})' if raised else ''}; {free:.1f} GiB free where the demos are written "
                    f"({plans[0].parent.parent}); nothing was kept: run it again, with fewer workers= if memory is short")


def generate(cfg: DemosConfig) -> dict:
    """Plan, convert and move into place; returns a report (counts, seeds, seconds, paths)."""
    if cfg.env.task not in solutions():
        raise UserError(f"no motion-planning solution for {cfg.env.task}; tasks with one: {', '.join(sorted(solutions()))}")
    if cfg.n < 1:
        raise UserError(f"n must be >= 1, got {cfg.n}")
    if cfg.workers < 1:
        raise UserError(f"workers={cfg.workers} must be >= 1 (planning processes; at most n are used)")
    if not 0 <= cfg.max_failure_rate < 1:  # the failure budget divides by 1 - rate
        raise UserError(f"max_failure_rate={cfg.max_failure_rate} must be >= 0 and < 1 (the fraction of plans that may fail before demos gives up)")
    if cfg.env.control_mode is None:
        raise UserError("env.control_mode must be set for demos (e.g. pd_ee_delta_pos)")
    out_dir = Path(cfg.out or Path("datasets") / cfg.env.task)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"out={out_dir} is a file: give the folder the demonstrations go to")
    with make_env(replace(cfg.env, num_envs=1)):  # every env field checked now, not after minutes of planning
        pass
    final = out_dir / demos_file(cfg.n, cfg.seed, cfg.env.obs_mode, cfg.env.control_mode)
    if cfg.env.obs_mode == "rgb" and final.with_suffix(".json").is_file():  # its name does not say the camera's size
        kwargs = json.loads(final.with_suffix(".json").read_text()).get("env_info", {}).get("env_kwargs", {})
        size = kwargs.get("sensor_configs", {}).get("width")
        if size is not None and size != cfg.env.image_size:
            raise UserError(f"{final} holds these demos with {size} px images, which env.image_size={cfg.env.image_size} would replace "
                            f"(a teacher trained on them records that file): give another out=, or move it away first")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file on the way, no permission, a read-only disk: said now, not as a traceback
        raise UserError(f"out={out_dir} cannot be created ({err.strerror}): give a folder you can write to") from err
    remove_orphaned(out_dir, ".demos-")  # the temp folders of runs killed with SIGKILL
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f".demos-{os.getpid()}-", dir=out_dir) as tmp:
        parts, plan_report = _plan(cfg, Path(tmp))
        plan_seconds = time.perf_counter() - start
        converted_parts = _convert(cfg, parts)
        plans, converted = Path(tmp) / "plans.h5", Path(tmp) / "demos.h5"
        _merge_in_seed_order(plans, parts)
        _merge_in_seed_order(converted, converted_parts)
        convert_seconds = time.perf_counter() - start - plan_seconds
        meta = json.loads(converted.with_suffix(".json").read_text())
        plan_meta = json.loads(plans.with_suffix(".json").read_text())
        # replay_trajectory drops where the episodes came from; keep it.
        meta.update({k: plan_meta[k] for k in ("source_type", "source_desc") if k in plan_meta})
        converted.with_suffix(".json").write_text(json.dumps(meta, indent=2))
        kept = len(meta["episodes"])
        if kept == 0:
            raise UserError(f"none of the {cfg.n} plans replayed successfully under env.control_mode={cfg.env.control_mode}: "
                            "nothing was written; try another control mode (pd_joint_pos replays plans exactly)")
        raw = out_dir / demos_file(cfg.n, cfg.seed, "none", "pd_joint_pos")
        for src, dst in ((plans, raw), (converted, final)):
            os.replace(src.with_suffix(".json"), dst.with_suffix(".json"))
            os.replace(src, dst)
    return {
        "task": cfg.env.task, "path": str(final), "plans_path": str(raw), "requested": cfg.n,
        "planned": len(plan_report["seeds"]), "failed_plans": len(plan_report["failed_seeds"]), "converted": kept,
        "plan_seconds": round(plan_seconds, 1), "convert_seconds": round(convert_seconds, 1), **plan_report,
    }


ENV_FIELDS = ("task", "obs_mode", "control_mode", "image_size")  # what planning and conversion take from env


def main(cfg: DictConfig) -> dict:
    from hydra.core.hydra_config import HydraConfig

    from robodistill.configs import given_fields

    config = DemosConfig(**{**OmegaConf.to_container(cfg, resolve=True), "env": EnvConfig.from_mapping(cfg.env)})
    unused = sorted(k for k in given_fields() if k.startswith("env.") and k.removeprefix("env.") not in ENV_FIELDS)
    if unused:  # else ignored without a word: a user could think the demos were made for them
        print(f"{', '.join(unused)}: not used, demos are planned until solved on the CPU simulator and recorded "
              f"with env.{', env.'.join(ENV_FIELDS[1:])} only")
    report = generate(config)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    (run_dir / "demos.json").write_text(json.dumps(report, indent=2))
    print(
        f"{report['task']}: {report['converted']}/{report['requested']} demonstrations in {report['path']}\n"
        f"  planning {report['plan_seconds']}s (failed plans, retried with new seeds: {report['failed_plans']}), "
        f"conversion to {config.env.obs_mode}/{config.env.control_mode} {report['convert_seconds']}s"
    )
    if report["converted"] < report["requested"]:
        print(f"  plans that did not replay successfully in {config.env.control_mode}, dropped: {report['requested'] - report['converted']}")
    return report
