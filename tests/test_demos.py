"""Real motion-planning demos, round-tripped through robodistill and ManiSkill's own tools."""

import json
import os
import re
import shutil
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch

from robodistill.data import Horizons, WindowDataset, fit_normalizers, load_episodes, open_trajectory
from robodistill.data.info import describe, format_summary
from robodistill.envs import EnvConfig, make_env
from robodistill.errors import UserError
from tests.conftest import ROBODISTILL, disk_full_past, run_cli


@pytest.fixture
def pushcube(pushcube_demos):
    return pushcube_demos


def test_demos_load_with_seeds_success_and_windows(pushcube):
    episodes = load_episodes(pushcube, control_mode="pd_ee_delta_pos", obs_mode="state")
    assert len(episodes) == 3 and all(e.success for e in episodes)
    assert sorted(e.seed for e in episodes) == [10, 11, 12]
    assert all(e.obs["state"].shape == (len(e) + 1, 35) and e.actions.shape == (len(e), 4) for e in episodes)
    norms = fit_normalizers(episodes)
    ds = WindowDataset(episodes, Horizons(), delta_actions=True, normalizers=norms)
    assert len(ds) == sum(len(e) - 16 + 8 - 1 + 2 for e in episodes)
    batch = torch.utils.data.default_collate([ds[i] for i in range(8)])
    assert batch["obs"]["state"].shape == (8, 2, 35) and batch["actions"].shape == (8, 16, 4)
    assert batch["actions"].abs().max() <= 1 + 1e-5
    # the raw plans are kept too, for converting to other modes later
    plans = open_trajectory(pushcube.parent / "mp_n3_seed10.none.pd_joint_pos.h5")
    assert plans.control_mode == "pd_joint_pos" and len(plans.meta["episodes"]) == 3
    assert not list(pushcube.parent.glob(".demos-*"))  # no temp folder left


def test_demos_are_in_seed_order_whatever_the_workers(pushcube):
    # made by 2 workers (seeds 10, 12 and 11): the files held them by worker, so num_demos=2 ("the first 2") took
    # seeds 10 and 12 where one worker's file gave 10 and 11
    for path in (pushcube, pushcube.parent / "mp_n3_seed10.none.pd_joint_pos.h5"):
        rows = json.loads(path.with_suffix(".json").read_text())["episodes"]
        assert [(row["episode_id"], row["episode_seed"]) for row in rows] == [(0, 10), (1, 11), (2, 12)]
    assert [e.seed for e in load_episodes(pushcube)] == [10, 11, 12]


def test_demo_first_state_matches_the_live_env(pushcube):
    ep = min(load_episodes(pushcube), key=lambda e: e.seed)
    with make_env(EnvConfig(task="PushCube-v1")) as env:
        obs = env.reset(seed=[ep.seed])
    np.testing.assert_allclose(obs["state"][0].numpy(), ep.obs["state"][0], atol=1e-4)


def test_maniskill_tools_read_and_replay_our_files(pushcube):
    from mani_skill.trajectory.dataset import ManiSkillTrajectoryDataset

    ms = ManiSkillTrajectoryDataset(str(pushcube))
    assert len(ms) == sum(len(e) for e in load_episodes(pushcube))
    replay = subprocess.run(
        [sys.executable, "-m", "mani_skill.trajectory.replay_trajectory", "--traj-path", str(pushcube),
         "--use-first-env-state", "-c", "pd_ee_delta_pos", "-o", "state", "-b", "physx_cpu"],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300,
    )
    assert replay.returncode == 0, replay.stderr[-2000:]
    assert "3/3=100.00%" in replay.stdout + replay.stderr


def test_the_control_mode_error_names_a_conversion_that_works(pushcube, tmp_path):
    with pytest.raises(UserError, match="recorded with control_mode=pd_ee_delta_pos") as err:
        load_episodes(pushcube, control_mode="pd_joint_delta_pos", obs_mode="state")
    command = re.search(r"\((python -m .*)\)", str(err.value)).group(1)
    plans = tmp_path / "plans.h5"  # a copy: the replay writes beside the file it reads
    for suffix in (".h5", ".json"):
        shutil.copy(pushcube.parent / f"mp_n3_seed10.none.pd_joint_pos{suffix}", plans.with_suffix(suffix))
    argv = [sys.executable if w == "python" else str(plans) if w == "<its" else w
            for w in command.replace("<its .pd_joint_pos.h5>", "<its").split()]
    replay = subprocess.run(argv, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert replay.returncode == 0, replay.stderr[-2000:]
    (converted,) = tmp_path.glob("plans.*pd_joint_delta_pos*.h5")
    episodes = load_episodes(converted, control_mode="pd_joint_delta_pos", obs_mode="state", task="PushCube-v1")
    assert len(episodes) == 3 and episodes[0].obs["state"].shape[1] == 35


def test_files_recorded_without_an_obs_mode_or_as_state_dict_read_as_state(tmp_path):
    """A user's own recording with ManiSkill's RecordEpisode: from an env made without obs_mode its json records
    none (it was refused as 'actions and no observations'), with obs_mode=state_dict it holds the state's parts
    (refused, with no fix to give). Both are the env's state vector."""
    import gymnasium as gym
    from mani_skill.utils.wrappers.record import RecordEpisode

    for name, kwargs in (("default", {}), ("state_dict", {"obs_mode": "state_dict"})):
        env = RecordEpisode(gym.make("PushCube-v1", control_mode="pd_ee_delta_pos", sim_backend="physx_cpu", **kwargs),
                            output_dir=str(tmp_path), trajectory_name=name, save_video=False)
        env.action_space.seed(0)
        for seed in (0, 1):
            env.reset(seed=seed)
            for _ in range(5):
                env.step(env.action_space.sample())
        env.close()
        episodes = load_episodes(tmp_path / f"{name}.h5", control_mode="pd_ee_delta_pos", obs_mode="state", task="PushCube-v1")
        assert [(e.seed, len(e)) for e in episodes] == [(0, 5), (1, 5)]
        with make_env(EnvConfig(task="PushCube-v1")) as live:
            obs = live.reset(seed=[1])
        np.testing.assert_allclose(episodes[1].obs["state"][0], obs["state"][0].numpy(), atol=1e-4)

    # written by hand with h5py's defaults, the parts list alphabetically: they were flattened in that order, silently
    with h5py.File(tmp_path / "state_dict.h5", "r+") as f:
        extra = f["traj_0/obs/extra"]
        f.create_group("traj_0/obs/alphabetical")
        for key in extra:
            extra.copy(key, f["traj_0/obs/alphabetical"])
        del f["traj_0/obs/extra"]
        f.move("traj_0/obs/alphabetical", "traj_0/obs/extra")
    with pytest.raises(UserError, match="state_dict.h5, episode traj_0: /traj_0/obs/extra was written without h5py's track_order, "
                                        "so the order of its members \\['goal_pos', 'obj_pose', 'tcp_pose'\\] .* track_order=True"):
        load_episodes(tmp_path / "state_dict.h5", control_mode="pd_ee_delta_pos", obs_mode="state")


def two_camera_file(path, track_order: bool, T: int = 2, size: int = 4):
    """A hand-made rgb trajectory file whose cameras are, in the env's order, wrist (pixels 10 + t) then base
    (200 + t)."""
    with h5py.File(path, "w") as f:
        group = f.create_group("traj_0", track_order=True)
        group["actions"] = np.zeros((T, 4), np.float32)
        obs = group.create_group("obs", track_order=True)
        obs.create_group("agent", track_order=True)["qpos"] = np.zeros((T + 1, 9), np.float32)
        obs.create_group("extra", track_order=True)["tcp_pose"] = np.zeros((T + 1, 7), np.float32)
        cameras = obs.create_group("sensor_data", track_order=track_order)  # h5py's default: no track_order
        for name, value in (("wrist", 10), ("base", 200)):
            frames = value + np.arange(T + 1, dtype=np.uint8)[:, None, None, None]
            cameras.create_group(name)["rgb"] = np.broadcast_to(frames, (T + 1, size, size, 3))
    path.with_suffix(".json").write_text(json.dumps({
        "env_info": {"env_id": "PushCube-v1", "env_kwargs": {"obs_mode": "rgb", "control_mode": "pd_ee_delta_pos"}},
        "episodes": [{"episode_id": 0, "episode_seed": 0, "success": True}]}))
    return path


def test_cameras_written_without_track_order_are_refused_not_swapped(tmp_path):
    """Several cameras' images are concatenated channel by channel in the env's camera order (ManiSkill's
    FlattenRGBDObservationWrapper). A sensor_data group written without track_order lists its cameras
    alphabetically: a file of the cameras wrist then base read base's pixels as the first 3 channels, silently."""
    path = two_camera_file(tmp_path / "cameras.h5", track_order=False)
    with pytest.raises(UserError, match="cameras.h5, episode traj_0: /traj_0/obs/sensor_data was written without h5py's "
                                        "track_order, so the order of its members \\['base', 'wrist'\\]"):
        load_episodes(path, obs_mode="rgb")


def test_several_cameras_stay_on_disk_beyond_max_memory_gb_as_one_camera_does(tmp_path):
    """They were concatenated in memory whatever their size; now a window reads its frames of each camera."""
    path = two_camera_file(tmp_path / "cameras.h5", track_order=True, T=5)
    (on_disk,), (in_memory,) = load_episodes(path, obs_mode="rgb", max_memory_gb=0), load_episodes(path, obs_mode="rgb")
    assert not isinstance(on_disk.obs["rgb"], np.ndarray)
    assert on_disk.obs["rgb"].shape == in_memory.obs["rgb"].shape == (6, 4, 4, 6)
    np.testing.assert_array_equal(in_memory.obs["rgb"][2, 0, 0], [12, 12, 12, 202, 202, 202])  # wrist, then base
    h = Horizons(obs=2, pred=4, act=2)
    windows = [WindowDataset([ep], h, delta_actions=True) for ep in (on_disk, in_memory)]
    assert len(windows[0]) == len(windows[1]) == 4
    for i in range(len(windows[0])):
        torch.testing.assert_close(windows[0][i]["obs"]["rgb"], windows[1][i]["obs"]["rgb"])


def test_dataset_info_reads_shapes_not_images(tmp_path):
    summary, (episode,) = describe(two_camera_file(tmp_path / "cameras.h5", track_order=True))
    assert summary["observations"]["rgb"] == {"shape": [4, 4, 6], "dtype": "uint8"}
    assert not isinstance(episode.obs["rgb"], np.ndarray)  # every frame of every camera was read to print a shape


def test_the_obs_mode_error_names_the_fix(pushcube, pickcube_rgb_demos):
    # it named the mismatch only; env.obs_mode=state, say, is the setting the user can change
    with pytest.raises(UserError, match="holds obs_mode=state observations, but obs_mode=rgb was asked for: train with "
                                        "env.obs_mode=state .* -c pd_ee_delta_pos -o rgb --save-traj"):
        load_episodes(pushcube, control_mode="pd_ee_delta_pos", obs_mode="rgb")
    with pytest.raises(UserError, match="holds obs_mode=rgb observations, but obs_mode=state was asked for: train with env.obs_mode=rgb"):
        load_episodes(pickcube_rgb_demos["path"], obs_mode="state")


def test_rgb_demos_match_the_live_rgb_env(pickcube_rgb_demos):
    assert pickcube_rgb_demos["converted"] == 2 and pickcube_rgb_demos["planned"] == 2
    episodes = load_episodes(pickcube_rgb_demos["path"], obs_mode="rgb")
    ep = min(episodes, key=lambda e: e.seed)
    assert ep.obs["rgb"].shape == (len(ep) + 1, 48, 48, 3) and ep.obs["rgb"].dtype == np.uint8
    with make_env(EnvConfig(task="PickCube-v1", obs_mode="rgb", image_size=48)) as env:
        obs = env.reset(seed=[ep.seed])
    np.testing.assert_allclose(obs["state"][0].numpy(), ep.obs["state"][0], atol=1e-4)
    assert obs["rgb"].shape[1:] == ep.obs["rgb"].shape[1:]
    sample = WindowDataset(episodes, Horizons(), delta_actions=True)[0]
    assert sample["obs"]["rgb"].shape == (2, 48, 48, 3) and sample["obs"]["rgb"].dtype == torch.uint8


def test_rgb_demos_of_another_camera_size_do_not_replace_those_on_disk(pickcube_rgb_demos, tmp_path):
    from pathlib import Path

    from robodistill.demos import DemosConfig, generate

    # The same n, seed and modes write the same file name whatever the camera: 32 px demos replaced the 48 px ones unsaid.
    held = Path(pickcube_rgb_demos["path"])
    for suffix in (".h5", ".json"):
        shutil.copy(held.with_suffix(suffix), tmp_path / held.with_suffix(suffix).name)
    before = (tmp_path / held.name).read_bytes()
    with pytest.raises(UserError, match="holds these demos with 48 px images, which env.image_size=32 would replace"):
        generate(DemosConfig(env=EnvConfig(task="PickCube-v1", obs_mode="rgb", image_size=32), n=2, seed=0, out=str(tmp_path)))
    assert (tmp_path / held.name).read_bytes() == before


def test_dataset_info_prints_and_plots(pushcube, tmp_path):
    r = run_cli("dataset", "info", str(pushcube), "--plot", str(tmp_path / "ranges.png"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for text in ("PushCube-v1", "control_mode=pd_ee_delta_pos", "episodes      3, 3 successful (100%)", "state (35,) float32", "actions       (4,)"):
        assert text in r.stdout
    assert (tmp_path / "ranges.png").read_bytes()[:4] == b"\x89PNG"


def test_dataset_info_plot_paths(pushcube, tmp_path, cli_here):
    # --plot into a folder to make, or where none can be, or not a .png: it ended in tracebacks, or printed a path
    # matplotlib had not written (x.png for --plot x)
    (tmp_path / "a_file").write_text("")
    r = cli_here("dataset", "info", str(pushcube), "--plot", str(tmp_path / "new" / "ranges.png"))
    assert r.returncode == 0 and (tmp_path / "new" / "ranges.png").is_file(), r.stderr[-2000:]
    r = cli_here("dataset", "info", str(pushcube), "--plot", str(tmp_path / "a_file" / "ranges.png"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert re.search("cannot write the plot .*a_file/ranges.png \\(File exists: .*a_file\\)", r.stderr)
    assert "episodes      3, 3 successful" in r.stdout  # the summary is said all the same
    for plot in ("ranges", "ranges.txt"):
        r = cli_here("dataset", "info", str(pushcube), "--plot", str(tmp_path / plot))
        assert r.returncode == 2 and f"--plot {tmp_path / plot}: give a .png path" in r.stderr, r.stderr[-2000:]
    assert not list(tmp_path.glob("ranges*"))


def copy_pair(src, dst_dir, name="copy"):
    h5 = dst_dir / f"{name}.h5"
    shutil.copy(src, h5)
    shutil.copy(src.with_suffix(".json"), h5.with_suffix(".json"))
    return h5


def test_bad_trajectory_files_name_the_file_episode_and_problem(pushcube, tmp_path):
    truncated = copy_pair(pushcube, tmp_path, "truncated")
    truncated.write_bytes(truncated.read_bytes()[:96])  # what ManiSkill's planner entry point once left
    with pytest.raises(UserError, match="truncated.h5' \\(96 bytes\\) is not a readable HDF5 file"):
        load_episodes(truncated)

    lonely = tmp_path / "lonely.h5"
    shutil.copy(pushcube, lonely)
    with pytest.raises(UserError, match="lonely.json' is missing"):
        load_episodes(lonely)

    mismatched = copy_pair(pushcube, tmp_path, "mismatched")
    meta = json.loads(mismatched.with_suffix(".json").read_text())
    meta["episodes"].append({**meta["episodes"][0], "episode_id": 99})
    mismatched.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="lists episodes \\['traj_99'\\] that .*mismatched.h5' does not have"):
        load_episodes(mismatched)

    with pytest.raises(UserError, match="recorded with control_mode=pd_ee_delta_pos, but pd_joint_pos was asked for"):
        load_episodes(pushcube, control_mode="pd_joint_pos")

    for name, edit, message in (("empty", lambda rows: [], "holds no episodes"),
                                ("unnumbered", lambda rows: [{k: v for k, v in r.items() if k != "episode_id"} for r in rows],
                                 "every entry of 'episodes' needs an episode_id")):
        odd = copy_pair(pushcube, tmp_path, name)
        meta = json.loads(odd.with_suffix(".json").read_text())
        odd.with_suffix(".json").write_text(json.dumps({**meta, "episodes": edit(meta["episodes"])}))
        with pytest.raises(UserError, match=f"{name}.json'"):
            load_episodes(odd)
        with pytest.raises(UserError, match=message):
            describe(odd)  # `dataset info`

    ragged = copy_pair(pushcube, tmp_path, "ragged")
    with h5py.File(ragged, "r+") as f:
        state = f["traj_1/obs"][:]
        del f["traj_1/obs"]
        f["traj_1/obs"] = state[:, :30]
    with pytest.raises(UserError, match="ragged.h5, episode traj_1: shapes .*'state': \\(30,\\).* differ"):
        load_episodes(ragged)

    with pytest.raises(UserError, match="is a folder: give the .h5 trajectory file in it"):
        load_episodes(tmp_path)
    checkpoint = tmp_path / "teacher.pt"
    torch.save({"kind": "diffusion"}, checkpoint)
    with pytest.raises(UserError, match="teacher.pt' is a torch checkpoint \\(a zip archive\\), not a ManiSkill trajectory"):
        describe(checkpoint)  # `dataset info`; train-teacher dataset= opens files the same way
    with pytest.raises(UserError, match="obs_mode=none files only hold actions"):
        load_episodes(pushcube.parent / "mp_n3_seed10.none.pd_joint_pos.h5")
    # as train-teacher opens it: the plans' control mode would not help, their conversion would
    with pytest.raises(UserError, match=f"holds actions and no observations .*: give dataset={pushcube} \\(its conversion"):
        load_episodes(pushcube.parent / "mp_n3_seed10.none.pd_joint_pos.h5", control_mode="pd_ee_delta_pos", obs_mode="state")
    replayed = copy_pair(pushcube, tmp_path, "replayed")  # replay_trajectory's output records no source_type
    meta = json.loads(replayed.with_suffix(".json").read_text())
    replayed.with_suffix(".json").write_text(json.dumps({**meta, "source_type": None}))
    assert "source=not recorded" in format_summary(describe(replayed)[0])
    raw, _ = describe(pushcube.parent / "mp_n3_seed10.none.pd_joint_pos.h5")  # `dataset info` reads what demos writes
    assert raw["episodes"] == 3 and raw["observations"] == {} and raw["actions"]["shape"] == [8] and "actions only" in format_summary(raw)


def test_nan_and_inf_in_a_dataset_are_named_not_trained_on(pushcube, tmp_path):
    # train-teacher trained on them without a word: NaN losses, or an action dimension squashed by an inf range
    for name, key, value, message in (("nan_actions", "actions", np.nan, "actions hold nan at step 5, dimension 1"),
                                      ("inf_states", "obs", -np.inf, "state observations hold -inf at step 5, dimension 1")):
        bad = copy_pair(pushcube, tmp_path, name)
        with h5py.File(bad, "r+") as f:
            f[f"traj_2/{key}"][5, 1] = value
        with pytest.raises(UserError, match=f"{name}.h5, episode traj_2: {message} \\(non-finite values in the episode: 1\\): "
                                            "drop the episode from the .json's episodes"):
            load_episodes(bad, control_mode="pd_ee_delta_pos", obs_mode="state")
        meta = json.loads(bad.with_suffix(".json").read_text())  # the fix it names
        bad.with_suffix(".json").write_text(json.dumps({**meta, "episodes": meta["episodes"][:2]}))
        assert len(load_episodes(bad, control_mode="pd_ee_delta_pos", obs_mode="state")) == 2


def test_an_episode_without_steps_is_named(pushcube, tmp_path, cli_here):
    # train-teacher ended in an IndexError traceback (fitting the normalizers, or padding its windows)
    empty = copy_pair(pushcube, tmp_path, "empty_episode")
    with h5py.File(empty, "r+") as f:
        for key in ("actions", "obs", "terminated", "truncated", "success"):
            first = f[f"traj_1/{key}"][: 1 if key == "obs" else 0]
            del f[f"traj_1/{key}"]
            f[f"traj_1/{key}"] = first
    r = cli_here("train-teacher", "env=PushCube-v1", f"dataset={empty}", "iterations=10", "eval_episodes=0")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "empty_episode.h5, episode traj_1: has no steps (0 actions): drop it from the .json's episodes" in r.stderr


def test_a_json_without_control_mode_says_to_add_it(pushcube, tmp_path):
    # it said "recorded with control_mode=None ...: set env.control_mode=None", which no command takes
    bare = copy_pair(pushcube, tmp_path, "bare")
    meta = json.loads(bare.with_suffix(".json").read_text())
    meta["env_info"]["env_kwargs"].pop("control_mode")
    meta["episodes"] = [{k: v for k, v in row.items() if k != "control_mode"} for row in meta["episodes"]]
    bare.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="bare.json' records no control mode .*: add the one its actions were recorded with"):
        load_episodes(bare, control_mode="pd_ee_delta_pos", obs_mode="state")


def test_demos_refuses_tasks_without_a_planner_and_bad_fields_before_planning(tmp_path, cli_here):
    r = cli_here("demos", "env=PushT-v1", "n=1")
    assert r.returncode == 2 and "no motion-planning solution for PushT-v1" in r.stderr and "PickCube-v1" in r.stderr
    # A bad env field or out= is named before any planning starts, and nothing is written.
    (tmp_path / "a_file").write_text("")
    for args, message in {("env.control_mode=teleport",): "control_mode 'teleport' is not valid for PushCube-v1",
                          ("env.obs_mode=depth",): "unknown obs_mode 'depth'",
                          (f"out={tmp_path / 'a_file'}",): "is a file: give the folder",
                          (f"out={tmp_path / 'a_file' / 'ds'}",): "cannot be created (Not a directory): give a folder you can write to",
                          ("workers=0",): "workers=0 must be >= 1",
                          ("max_failure_rate=1",): "max_failure_rate=1.0 must be >= 0 and < 1",
                          ("max_failure_rate=-0.5",): "max_failure_rate=-0.5 must be >= 0 and < 1"}.items():
        r = cli_here("demos", "env=PushCube-v1", "n=1", *args)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr[-2000:])
    assert not (tmp_path / "datasets").exists()
    # Killed (SIGTERM: `kill`, `timeout`, a scheduler) while planning: its temporary folder goes with it. One left by a
    # run killed with SIGKILL is removed by the next run there; one whose run is alive is not.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    (tmp_path / "datasets" / "PushCube-v1" / f".demos-{dead}-x1" / "plans").mkdir(parents=True)
    running = tmp_path / "datasets" / "PushCube-v1" / f".demos-{os.getpid()}-x2"
    running.mkdir()
    proc = subprocess.Popen([*ROBODISTILL, "demos", "env=PushCube-v1", "n=50", "env.max_episode_steps=20"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp_path / "datasets").glob(f"PushCube-v1/.demos-{proc.pid}-*")):
        time.sleep(0.1)
    time.sleep(3)  # into the planning
    proc.terminate()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip().endswith("interrupted"), err[-2000:]
    assert list((tmp_path / "datasets" / "PushCube-v1").iterdir()) == [running]
    assert "env.max_episode_steps: not used, demos are planned until solved" in out, out  # not ignored without a word


def test_a_planning_worker_that_dies_ends_demos_in_one_line_not_a_wait_forever(tmp_path):
    # A disk with no room (here a file-size limit, as one process meets a full disk): HDF5 crashes the worker closing its
    # file, and multiprocessing.Pool, which replaces a dead worker and leaves its job pending, waited for it forever.
    import resource

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (8_000, 8_000))

    r = subprocess.run([*ROBODISTILL, "demos", "env=PushCube-v1", "n=1", f"out={tmp_path / 'ds'}"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300, preexec_fn=small_files)
    assert r.returncode == 2 and "error: a planning worker process died after 1 of 1 demos (a crash in" in r.stderr, r.stderr[-2000:]
    assert os.listdir(tmp_path / "ds") == []  # nothing half-written left behind


def test_failed_episodes_in_a_file_are_noted(pushcube, tmp_path, capsys):
    # a RecordEpisode of a policy holds failures; they were imitated without a word (`demos` never writes them)
    mixed = copy_pair(pushcube, tmp_path, "mixed")
    meta = json.loads(mixed.with_suffix(".json").read_text())
    meta["episodes"][1]["success"] = False
    mixed.with_suffix(".json").write_text(json.dumps(meta))
    assert len(load_episodes(mixed)) == 3
    assert (f"note: '{mixed}': 1 of 3 episodes are marked success: false (traj_1) and are trained on like the rest: "
            "drop them from its .json's episodes to leave them out") in capsys.readouterr().out
    load_episodes(pushcube)
    assert "success: false" not in capsys.readouterr().out


def test_a_conversion_the_disk_has_no_room_for_is_one_line(tmp_path):
    # replay_trajectory's failure was a RuntimeError traceback holding the whole command and its stderr's tracebacks
    import resource

    # With workers=2, ManiSkill's converter (its --num-envs: a multiprocessing.Pool) waited forever for the worker that died.
    r = subprocess.run([*ROBODISTILL, "demos", "env=PushCube-v1", "n=2", "seed=3", "workers=2", f"out={tmp_path / 'ds'}"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300,  # plans fit below the limit, states do not
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (32_000, resource.RLIM_INFINITY)))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert re.search(r"^error: converting the plans to state/pd_ee_delta_pos with ManiSkill's replay_trajectory failed: it .*"
                     r"\(RuntimeError: .*\); [\d.]+ GiB free where the demos are written \(.*ds\); nothing was kept", r.stderr, re.M)
    assert os.listdir(tmp_path / "ds") == []


def test_demos_the_disk_has_no_room_for_as_one_file_are_one_line(pushcube, tmp_path):
    # the workers' files are merged by h5py's copy, whose failed write was a RuntimeError traceback of many lines
    from robodistill.demos import _merge_in_seed_order

    (tmp_path / "part").mkdir()
    with disk_full_past(pushcube.stat().st_size // 2), pytest.raises(UserError) as said:
        _merge_in_seed_order(tmp_path / "part" / "demos.h5", [pushcube])
    assert re.fullmatch(rf"writing the demos into one file failed: File too large; [\d.]+ GiB free where the demos are written "
                        rf"\({tmp_path}\); nothing was kept", str(said.value)), str(said.value)


def test_demos_killed_with_sigkill_leaves_no_process_behind(tmp_path):
    # Its planning workers planned on, orphaned, then waited for work forever, holding the progress queue's process,
    # the forkserver and the resource tracker with them.
    import psutil

    proc = subprocess.Popen([*ROBODISTILL, "demos", "env=PushCube-v1", "n=40", "workers=2", f"out={tmp_path / 'ds'}"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    main = psutil.Process(proc.pid)
    deadline = time.time() + 120
    while time.time() < deadline and len(main.children(recursive=True)) < 5:  # tracker, forkserver, queue, 2 workers
        time.sleep(0.2)
    left = main.children(recursive=True)
    assert len(left) >= 5
    proc.kill()
    proc.wait()
    _, alive = psutil.wait_procs(left, timeout=20)
    said = [p.cmdline()[-1][:80] for p in alive]
    for p in alive:  # not left to the next tests
        p.kill()
    assert alive == [], said
