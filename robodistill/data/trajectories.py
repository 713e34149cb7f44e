"""Reading ManiSkill trajectory files (`X.h5` + `X.json`), checked, into episodes.

The format is ManiSkill's own (written by `RecordEpisode`, `replay_trajectory`, its downloadable
demos): `traj_<id>/actions` (T, A), `traj_<id>/obs` (T+1 observations: an array for obs_mode=state,
a group agent/extra/sensor_data for rgb), and a json with `env_info` (env_id, env_kwargs) and one
row per episode (episode_id, episode_seed, control_mode, success, ...). Observations come out in
robodistill's convention: `state` (T+1, D) float32, and `rgb` (T+1, H, W, 3 * cameras) uint8.
"""

from __future__ import annotations

import json
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from robodistill.errors import UserError

ArrayLike = Any  # np.ndarray, or h5py.Dataset / CameraStack when left on disk


@dataclass
class Episode:
    source: Path
    episode_id: int
    seed: int | None
    success: bool | None
    actions: np.ndarray  # (T, A) float32
    obs: dict[str, ArrayLike]  # (T + 1, ...) per key
    step_success: np.ndarray | None = None  # (T,) bool: the task solved after each action, where recorded

    def __len__(self) -> int:
        return len(self.actions)


@dataclass
class TrajectoryFile:
    """One checked `.h5` + `.json` pair; episodes are read on demand with `episodes()`."""

    path: Path
    meta: dict
    h5: h5py.File = field(repr=False)

    @property
    def env_id(self) -> str:
        return self.meta["env_info"]["env_id"]

    @property
    def env_kwargs(self) -> dict:
        return self.meta["env_info"].get("env_kwargs", {})

    @property
    def control_mode(self) -> str | None:
        rows = self.meta["episodes"]
        return self.env_kwargs.get("control_mode") or (rows[0].get("control_mode") if rows else None)

    @property
    def obs_mode(self) -> str | None:
        return self.env_kwargs.get("obs_mode")

    def episodes(self, ids: list[int] | None = None, in_memory: bool = True, need_obs: bool = True) -> list[Episode]:
        """need_obs=False also reads files of actions only (obs_mode=none, e.g. raw plans): their `obs` is {}."""
        rows = self.meta["episodes"] if ids is None else [self.meta["episodes"][i] for i in ids]
        return [self._episode(row, in_memory, need_obs) for row in rows]

    def _episode(self, row: dict, in_memory: bool, need_obs: bool = True) -> Episode:
        name = f"traj_{row['episode_id']}"
        group = self.h5[name]
        where = f"{self.path}, episode {name}"
        has_obs = "obs" in group and len(group["obs"]) > 0
        if "actions" not in group or need_obs and not has_obs:
            raise UserError(f"{where}: has no 'actions' or no 'obs' (obs_mode=none files only hold actions; convert them with {replay_command('<file>', '<control mode>', 'state')})")
        actions = np.asarray(group["actions"][:], dtype=np.float32)
        if actions.ndim != 2:
            raise UserError(f"{where}: actions have shape {actions.shape}, expected (T, action_dim)")
        obs = _observations(group["obs"], in_memory, where) if has_obs else {}
        for key, value in obs.items():
            if len(value) != len(actions) + 1:
                raise UserError(f"{where}: {len(value)} '{key}' observations for {len(actions)} actions (expected T + 1)")
        step_success = np.asarray(group["success"][:], dtype=bool) if "success" in group else None
        return Episode(self.path, int(row["episode_id"]), _seed(row), row.get("success"), actions, obs, step_success)

    def seeds(self) -> list[int]:
        """The reset seeds its episodes start from, where its .json records them (without reading the .h5)."""
        return [seed for seed in map(_seed, self.meta["episodes"]) if seed is not None]

    def close(self) -> None:
        self.h5.close()


def _seed(row: dict) -> int | None:
    seed = row.get("episode_seed", row.get("reset_kwargs", {}).get("seed"))
    return None if seed is None else int(seed)


def episode_seeds(paths: list[str | Path]) -> dict[Path, list[int]]:
    """The reset seeds each trajectory file's episodes start from (see TrajectoryFile.seeds)."""
    out = {}
    for path in paths:
        f = open_trajectory(path)
        out[f.path] = f.seeds()
        f.close()
    return out


def seeds_by_file(episodes: list[Episode]) -> dict[Path, list[int]]:
    """The reset seeds `episodes` start from, per file, where recorded."""
    out: dict[Path, list[int]] = {}
    for ep in episodes:
        if ep.seed is not None:
            out.setdefault(ep.source, []).append(ep.seed)
    return out


def _observations(obs: h5py.Dataset | h5py.Group, in_memory: bool, where: str) -> dict[str, ArrayLike]:
    if isinstance(obs, h5py.Dataset):
        return {"state": np.asarray(obs[:], dtype=np.float32)}
    # The same flattening as ManiSkill's FlattenRGBDObservationWrapper: state = agent + extra, in
    # the order recorded (groups are written with track_order), images concatenated per camera.
    parts = [_flatten(obs[k], where) for k in _in_recorded_order(obs, where) if k not in ("sensor_data", "sensor_param")]
    out: dict[str, ArrayLike] = {"state": np.concatenate(parts, axis=1).astype(np.float32)}
    cameras = obs.get("sensor_data")
    if cameras is not None:
        # concatenated in the env's camera order, as FlattenRGBDObservationWrapper does: the recorded one
        rgb = [cameras[c]["rgb"] for c in _in_recorded_order(cameras, where) if "rgb" in cameras[c]]
        if not rgb:
            raise UserError(f"{where}: sensor_data has no rgb images")
        if in_memory:
            out["rgb"] = np.concatenate([r[:] for r in rgb], axis=-1)
        else:
            out["rgb"] = rgb[0] if len(rgb) == 1 else CameraStack(rgb)
    return out


class CameraStack:
    """Several cameras' images left on disk, read as one array of their channels side by side: a window reads
    its frames of each camera, not the whole episode."""

    def __init__(self, cameras: list[h5py.Dataset]):
        self.cameras = cameras

    def __len__(self) -> int:
        return len(self.cameras[0])

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.cameras[0].shape[:-1], sum(c.shape[-1] for c in self.cameras))

    @property
    def dtype(self) -> np.dtype:
        return self.cameras[0].dtype

    def __getitem__(self, index) -> np.ndarray:
        return np.concatenate([c[index] for c in self.cameras], axis=-1)


def _flatten(node: h5py.Dataset | h5py.Group, where: str) -> np.ndarray:
    """(T, D) from a nested group of (T,) or (T, d) arrays, depth-first in recorded order."""
    if isinstance(node, h5py.Group):
        return np.concatenate([_flatten(node[k], where) for k in _in_recorded_order(node, where)], axis=1)
    value = np.asarray(node[:], dtype=np.float32)
    return value.reshape(len(value), -1)


def _in_recorded_order(group: h5py.Group, where: str) -> list[str]:
    """The group's members in the order they were written. A group written without track_order (h5py's default,
    so a hand-made file) lists them alphabetically: extra's goal_pos before tcp_pose, which would train on a state
    vector laid out unlike the env's, undetected until the policy fails."""
    keys = list(group)
    if len(keys) > 1 and not group.id.get_create_plist().get_link_creation_order():
        raise UserError(f"{where}: {group.name} was written without h5py's track_order, so the order of its members "
                        f"{keys} (read alphabetically) may not be the env's observation order: write its groups with "
                        "create_group(..., track_order=True) in the env's order, as ManiSkill's RecordEpisode does, or "
                        "store the flat state vector as one (T, D) 'obs' dataset")
    return keys


def open_trajectory(path: str | Path) -> TrajectoryFile:
    """Open and check a trajectory pair; every problem names the file (and episode) and the fix."""
    path = Path(path)
    if path.suffix != ".h5":
        path = path.with_suffix(".h5") if path.with_suffix(".h5").exists() else path
    if path.is_dir():
        raise UserError(f"'{path}' is a folder: give the .h5 trajectory file in it (`ls {path}`)")
    if not path.is_file():
        raise UserError(f"trajectory file '{path}' does not exist{_how_to_make(path)}")
    if path.suffix != ".h5":
        what = "a torch checkpoint (a zip archive)" if zipfile.is_zipfile(path) else f"a {path.suffix or 'suffix-less'} file"
        raise UserError(f"'{path}' is {what}, not a ManiSkill trajectory: give an .h5 file with its .json beside it, "
                        f"as `robodistill demos` writes them")
    json_path = path.with_suffix(".json")
    if not json_path.is_file():
        raise UserError(f"'{json_path}' is missing: a ManiSkill trajectory is X.h5 plus X.json with env_info and episodes")
    try:
        meta = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"'{json_path}' is not valid JSON ({err})") from err
    for key in ("env_info", "episodes"):
        if key not in meta:
            raise UserError(f"'{json_path}' has no '{key}' field; is it a ManiSkill trajectory json?")
    if "env_id" not in meta["env_info"]:
        raise UserError(f"'{json_path}': env_info has no env_id")
    if not meta["episodes"]:
        raise UserError(f"'{json_path}' holds no episodes: make demonstrations with `robodistill demos`")
    if not all(isinstance(row, dict) and "episode_id" in row for row in meta["episodes"]):
        raise UserError(f"'{json_path}': every entry of 'episodes' needs an episode_id; is it a ManiSkill trajectory json?")
    try:
        h5 = h5py.File(path, "r")
    except OSError as err:
        raise UserError(f"'{path}' ({path.stat().st_size} bytes) is not a readable HDF5 file: truncated or corrupted? ({err})") from err
    missing = [f"traj_{row['episode_id']}" for row in meta["episodes"] if f"traj_{row['episode_id']}" not in h5]
    if missing:
        h5.close()
        raise UserError(f"'{json_path}' lists episodes {missing[:5]}{'...' if len(missing) > 5 else ''} that '{path}' does not have: the pair does not match (or the .h5 is truncated)")
    return TrajectoryFile(path, meta, h5)


def demos_file(n: int, seed: int, obs_mode: str, control_mode: str) -> str:
    """The name `robodistill demos` gives its files (and the commands' default dataset= expects), e.g.
    mp_n100_seed0.state.pd_ee_delta_pos.h5; DEMOS_FILE reads it back."""
    return f"mp_n{n}_seed{seed}.{obs_mode}.{control_mode}.h5"


DEMOS_FILE = re.compile(r"mp_n(\d+)_seed(\d+)\.(\w+)\.(\w+)\.h5")


def _how_to_make(path: Path) -> str:
    """The `robodistill demos` command that writes `path`, where its name is one that command gives."""
    named = DEMOS_FILE.fullmatch(path.name)
    if named is None:
        return ""
    n, seed, obs_mode, control_mode = named.groups()
    task = path.parent.name if path.parent.parent.name == "datasets" else "<task>"
    out = "" if task != "<task>" else f" out={path.parent}"
    return (f": make it with `robodistill demos env={task} n={n} seed={seed} env.obs_mode={obs_mode} "
            f"env.control_mode={control_mode}{out}`, or give dataset=<your .h5>")


def load_episodes(
    paths: str | Path | list[str | Path],
    control_mode: str | None = None,
    obs_mode: str | None = None,
    task: str | None = None,
    max_memory_gb: float = 8.0,
) -> list[Episode]:
    """Episodes from one or more trajectory files, checked against each other and the request.

    :param control_mode: if given, every file must have been recorded with it.
    :param obs_mode: `state` or `rgb`; if given, files must hold such observations.
    :param task: if given, every file must have been recorded in this env (two tasks can share a state size).
    :param max_memory_gb: RGB images stay on disk (read per window) beyond this estimated size.
    """
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise UserError("no trajectory files given")
    files = [open_trajectory(p) for p in paths]
    for f in files:
        if task is not None and f.env_id != task:
            raise UserError(f"'{f.path}' was recorded in {f.env_id}, not in {task}, the task it would train for: use "
                            f"demonstrations of {task}, or train for {f.env_id} (env={f.env_id}, where the command has env)")
        if obs_mode is not None and _file_obs_mode(f) == "none":  # said first: setting the control mode cannot help it
            mode = control_mode or f.control_mode
            named = DEMOS_FILE.fullmatch(f.path.name)
            converted = f.path.with_name(demos_file(int(named[1]), int(named[2]), obs_mode, mode)) if named else None
            use = f"give dataset={converted} (its conversion, beside it), or " if converted and converted.is_file() else ""
            raise UserError(f"'{f.path}' holds actions and no observations (ManiSkill's raw motion plans): {use}convert it "
                            f"({replay_command(f.path, mode, obs_mode)})")
        if control_mode is not None and f.control_mode is None:  # a hand-written .json: "set env.control_mode=None" would not do
            raise UserError(f"'{f.path.with_suffix('.json')}' records no control mode (env_info.env_kwargs.control_mode, or control_mode in its "
                            f"episodes): add the one its actions were recorded with, e.g. \"control_mode\": \"{control_mode}\" in env_kwargs")
        if control_mode is not None and f.control_mode != control_mode:
            raise UserError(f"'{f.path}' was recorded with control_mode={f.control_mode}, but {control_mode} was asked for: set "
                            f"env.control_mode={f.control_mode}, or convert the raw plans `robodistill demos` keeps beside it "
                            f"({replay_command('<its .pd_joint_pos.h5>', control_mode, obs_mode or _file_obs_mode(f))})")
        if obs_mode is not None and _file_obs_mode(f) != obs_mode:
            usable = _file_obs_mode(f) in ("state", "rgb")  # the modes robodistill's envs take
            use = f"train with env.obs_mode={_file_obs_mode(f)} (where the command has it), or " if usable else ""
            raise UserError(f"'{f.path}' holds obs_mode={_file_obs_mode(f)} observations, but obs_mode={obs_mode} was asked for: "
                            f"{use}convert the raw plans `robodistill demos` keeps beside it "
                            f"({replay_command('<its .pd_joint_pos.h5>', control_mode or f.control_mode, obs_mode)})")
    in_memory = sum(_rgb_bytes(f) for f in files) <= max_memory_gb * 2**30
    episodes: list[Episode] = []
    for f in files:
        _note_failures(f)
        episodes += f.episodes(in_memory=in_memory)
    _check_consistent(episodes)
    _check_finite(episodes)
    return episodes


def replay_command(traj: str | Path, control_mode: str, obs_mode: str) -> str:
    """ManiSkill's command that converts raw plans `traj` to the modes asked for, as the errors suggest it."""
    return (f"python -m mani_skill.trajectory.replay_trajectory --traj-path {traj} --use-first-env-state "
            f"-c {control_mode} -o {obs_mode} --save-traj")


def _file_obs_mode(f: TrajectoryFile) -> str:
    """What the file's observations are read as: `none`, `state`, `rgb` (or another mode, refused). A json without
    obs_mode (ManiSkill's RecordEpisode of an env made with its default obs_mode) says nothing: its first episode
    does. state_dict observations read as state: the env's state vector is their flattening, in recorded order."""
    mode = f.obs_mode
    if mode is None:
        obs = f.h5[f"traj_{f.meta['episodes'][0]['episode_id']}"].get("obs")
        if obs is None or len(obs) == 0:
            return "none"
        return "rgb" if isinstance(obs, h5py.Group) and "sensor_data" in obs else "state"
    if mode == "none":
        return "none"
    return "rgb" if "rgb" in mode or "sensor" in mode else "state" if mode == "state_dict" else mode


def _rgb_bytes(f: TrajectoryFile) -> int:
    total = 0
    for row in f.meta["episodes"]:
        sensors = f.h5[f"traj_{row['episode_id']}"].get("obs/sensor_data")
        if sensors is not None:
            total += sum(sensors[c]["rgb"].size for c in sensors if "rgb" in sensors[c])
    return total


def _note_failures(f: TrajectoryFile) -> None:
    """Failed episodes are imitated like the rest, as in ManiSkill's own datasets; said here because `demos` never
    writes them, so a file holding them (a RecordEpisode of a policy, teleoperation) may not be meant to."""
    failed = [row["episode_id"] for row in f.meta["episodes"] if row.get("success") is False]
    if failed:
        shown = ", ".join(f"traj_{i}" for i in failed[:5]) + (", ..." if len(failed) > 5 else "")
        print(f"note: '{f.path}': {len(failed)} of {len(f.meta['episodes'])} episodes are marked success: false ({shown}) "
              "and are trained on like the rest: drop them from its .json's episodes to leave them out")


def _check_finite(episodes: list[Episode]) -> None:
    """A NaN or inf (a glitched sensor, a solver that blew up) would train on silently: through the normalizers it
    makes every loss NaN, or squashes its dimension to 0. Named here with its episode and step instead."""
    for ep in episodes:
        for key, values in (("actions", ep.actions), ("state observations", ep.obs.get("state"))):
            bad = np.argwhere(~np.isfinite(values)) if values is not None else ()
            if len(bad):
                step, dim = bad[0][:2]
                raise UserError(f"{ep.source}, episode traj_{ep.episode_id}: {key} hold {values[step, dim]} at step {step}, dimension {dim} "
                                f"(non-finite values in the episode: {len(bad)}): drop the episode from the .json's episodes, or record it again")


def _check_consistent(episodes: list[Episode]) -> None:
    if not episodes:
        raise UserError("the trajectory files hold no episodes")
    empty = next((ep for ep in episodes if len(ep) == 0), None)
    if empty is not None:  # no action to learn or to pad a window with: it ended in an IndexError traceback
        raise UserError(f"{empty.source}, episode traj_{empty.episode_id}: has no steps (0 actions): drop it from the .json's "
                        "episodes, or record it again")
    first = episodes[0]
    want = {"actions": first.actions.shape[1:], **{k: tuple(v.shape[1:]) for k, v in first.obs.items()}}
    for ep in episodes[1:]:
        have = {"actions": ep.actions.shape[1:], **{k: tuple(v.shape[1:]) for k, v in ep.obs.items()}}
        if have != want:
            raise UserError(f"{ep.source}, episode traj_{ep.episode_id}: shapes {have} differ from {want} in {first.source}, episode traj_{first.episode_id}")
