"""`robodistill control`: a fixed-rate control loop that drives a robot from a policy server.

Built on openpi-client's runtime: `Runtime` runs the loop at `hz` (get_observation -> get_action ->
apply_action), the robot is an openpi `Environment`, the policy is `WebsocketClientPolicy`. What
openpi's `ActionChunkBroker` does not do, `ChunkAgent` adds: inference in the background, so the loop
never blocks on the network for longer than its deadline.

`ChunkAgent`, per control step:
  1. stacks the newest observation into the history the policy takes (a new episode starts with
     copies of its first observation, as in training and `robodistill eval`);
  2. when `replan_below` or fewer actions are left, sends the history to the server (one request in
     flight at a time);
  3. a chunk that arrives is timestamped by the step of its observation: action k of it belongs to
     that step + k, so actions whose time has passed are skipped, not executed late;
  4. with no action left, waits for the request in flight until `deadline_ms` after the step began;
     past the deadline it is late: `on_late=hold` repeats the last action, `on_late=stop` sends the
     stop action (zero arm motion under delta/velocity control, the last target under position
     control; the gripper keeps its last command; a bundle's own `action.stop`, such as an AGV's
     standstill command, where it has one). Under position control without `action.stop` the
     first step of an episode has no target to hold yet, so it waits for the first chunk up to `timeout_ms`;
  5. clamps the action to the bounds in the bundle's metadata.
A request unanswered for `timeout_ms` (a hung or vanished server), or one that fails (a server that closed
the connection, or answered with anything but a finite (n, A) chunk of the robot's actions), ends the run: that step sends the stop action (as `on_late=stop`), and the next step, or the
next reset, fails with one line. Requests run on daemon threads, so a server that never answers cannot keep
the process alive, nor Ctrl-C from ending it. Ctrl-C (or SIGTERM) sends the stop action too; either way the run's
episodes and telemetry up to the stop are saved.
With `replan_below=0` and no late steps, the loop executes exactly what `robodistill eval` does.

A robot is anything with openpi's `Environment` methods: `reset()`, `get_observation()` (one
frame: key -> array without history or batch dim, as the bundle's metadata lists them),
`apply_action({"actions": (A,) array})` and `is_episode_complete()`. `ManiSkillRobot` treats the
simulator as the robot. For a real arm, implement the same four methods: `reset` moves to the home
pose and waits, `get_observation` reads the joint/end-effector state (and camera) in the same units
and order as the training data, `apply_action` sends one command of the bundle's `control_mode`
at `control_freq` (metadata["env"]) without blocking, and `is_episode_complete` asks the operator
or a success detector.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from tqdm import tqdm
from openpi_client import base_policy
from openpi_client.runtime import agent as openpi_agent
from openpi_client.runtime import environment as openpi_environment
from openpi_client.runtime import subscriber as openpi_subscriber
from openpi_client.runtime.runtime import Runtime

import robodistill
from robodistill import checkpoints
from robodistill.envs import EnvConfig, VecEnv, make_env, zero_action_holds_still
from robodistill.errors import UserError
from robodistill.evaluation import EvalReport, check_seed, episode_metrics
from robodistill.summary import counted, kept_hz
from robodistill.wire import API_KEY_ENV, chunk_in, connect

ON_LATE = ("hold", "stop")


@dataclass
class ControllerConfig:
    """How `ChunkAgent` buffers, re-plans and handles late inference."""

    hz: float = 20.0  # control rate; 0: as fast as the robot steps (simulation only)
    replan_below: int = 0  # request the next chunk when this many actions are left; 0: when they run out
    deadline_ms: float | None = None  # how long a step may wait for a chunk; default half a period (hz=0: 1 s)
    on_late: str = "hold"  # hold | stop: what a step with no action in time sends
    timeout_ms: float = 2000.0  # a request unanswered this long stops the robot and ends the run

    def deadline_s(self) -> float:
        if self.deadline_ms is not None:
            return self.deadline_ms / 1e3
        return 0.5 / self.hz if self.hz > 0 else 1.0

    def check(self, chunk_length: int) -> None:
        if self.hz < 0:
            raise UserError(f"hz={self.hz} must be >= 0 (0: unpaced, simulation only)")
        if self.on_late not in ON_LATE:
            raise UserError(f"on_late='{self.on_late}' is not one of {', '.join(ON_LATE)}")
        if not 0 <= self.replan_below < chunk_length:
            raise UserError(f"replan_below={self.replan_below} must be between 0 and the chunk length - 1 ({chunk_length - 1})")
        if self.deadline_ms is not None and self.deadline_ms <= 0:
            raise UserError(f"deadline_ms={self.deadline_ms} must be > 0")
        if self.timeout_ms <= self.deadline_s() * 1e3:
            raise UserError(f"timeout_ms={self.timeout_ms} must be longer than the deadline ({self.deadline_s() * 1e3:g} ms)")


class ChunkAgent(openpi_agent.Agent):
    """Action chunks from a policy (openpi `BasePolicy`), executed one per step; see the module doc."""

    def __init__(self, policy: base_policy.BasePolicy, metadata: dict, cfg: ControllerConfig, prompt: str | None = None):
        self.policy, self.cfg = policy, cfg
        # A VLA bundle's instruction goes as text (`prompt`) with every request; the server embeds it.
        if prompt is not None and "prompt" not in metadata:
            raise UserError("prompt= is the instruction of a VLA bundle; this policy takes none")
        self.prompt = (prompt or metadata["prompt"]["default"]) if "prompt" in metadata else None
        self.keys = [k for k in metadata["observation"] if not (self.prompt is not None and k == "instruction")]
        self.obs_horizon = int(metadata["policy"]["obs_horizon"])
        self.low = np.asarray(metadata["action"]["low"], np.float32)
        self.high = np.asarray(metadata["action"]["high"], np.float32)
        self.stop_zeroes = np.full(self.low.shape, zero_action_holds_still(metadata["env"]["control_mode"]))
        self.stop_zeroes[metadata["action"].get("gripper_dims", [])] = False
        # A bundle may name its standstill command (an AGV's: zero velocity is not the zero action).
        stop = metadata["action"].get("stop")
        self.stop_action = None if stop is None else np.asarray(stop, np.float32)
        self._pending: tuple[Future, int, float] | None = None  # the request in flight, its observation's step, when sent
        self._failure: str | None = None  # why the run must end, raised at the next call after the stop action went out
        self.records: list[dict] = []  # one per step: episode, step, sent (when the action left), wait_ms, late
        self.requests: list[dict] = []  # one per chunk: round-trip and server milliseconds, skipped actions
        self.episode = -1  # Runtime calls reset() before every episode
        self._clear()

    def _clear(self) -> None:
        self.history: deque | None = None
        self.chunk: np.ndarray | None = None
        self.chunk_step = 0
        self.step = 0
        self.last: np.ndarray | None = None

    def reset(self) -> None:
        self._raise_failure()
        if self._pending is not None:  # let a request in flight finish; its chunk is for the old episode
            try:
                err = self._pending[0].exception(timeout=self._timeout_left())
            except FutureTimeout:
                self._hung()
                self._raise_failure()
            self._pending = None
            if err is not None:  # a server that failed as the episode ended would fail the next one's robot
                raise UserError(self._failed(err, "the run ended with the episode it was for"))
        self._clear()
        self.episode += 1
        self.policy.reset()

    def _submit(self, obs: dict) -> Future:
        future: Future = Future()

        def run() -> None:
            try:
                future.set_result(self._infer(obs))
            except BaseException as err:  # noqa: BLE001 - handed to the control loop, which reports it
                future.set_exception(err)

        threading.Thread(target=run, daemon=True, name="inference").start()
        return future

    def _timeout_left(self) -> float:
        return max(0.0, self._pending[2] + self.cfg.timeout_ms / 1e3 - time.perf_counter())

    def _hung(self) -> None:
        self._failure = (f"no answer from the policy server for {self.cfg.timeout_ms:g} ms (timeout_ms): the robot was sent "
                         "its stop action; check the server, or raise timeout_ms for a slow link")

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise UserError(self._failure)

    def _infer(self, obs: dict) -> tuple[np.ndarray, float, float]:
        start = time.perf_counter()
        result = self.policy.infer(obs)
        rtt = (time.perf_counter() - start) * 1e3
        return chunk_in(result, len(self.low), "this robot's"), rtt, float(result.get("server_timing", {}).get("infer_ms", float("nan")))

    @staticmethod
    def _failed(err: Exception, then: str) -> str:
        # a server that refused the request (a NaN from a sensor) or went away says so itself
        hint = "" if isinstance(err, UserError) else "; check the server"
        return f"inference failed: {err}; {then}{hint}"

    def _adopt(self) -> None:
        future, obs_step, _ = self._pending
        self._pending = None
        try:
            chunk, rtt, server_ms = future.result()
        except Exception as err:  # a server gone or failing ends the run as a hung one does
            self.chunk = None  # nothing more of it: this step sends the stop action
            self._failure = self._failed(err, "the robot was sent its stop action")
            return
        skipped = min(self.step - obs_step, len(chunk))
        self.chunk, self.chunk_step = chunk, obs_step
        self.requests.append({"episode": self.episode, "step": obs_step, "round_trip_ms": rtt, "server_ms": server_ms, "skipped": skipped})

    def _left(self) -> int:
        return 0 if self.chunk is None else max(0, len(self.chunk) - (self.step - self.chunk_step))

    def get_action(self, observation: dict) -> dict:
        self._raise_failure()
        start = time.perf_counter()
        frame = {k: np.asarray(observation[k]) for k in self.keys}
        if self.history is None:
            self.history = deque([frame] * self.obs_horizon, maxlen=self.obs_horizon)
        else:
            self.history.append(frame)
        if self._pending is not None and self._pending[0].done():
            self._adopt()
        if self._pending is None and self._failure is None and self._left() <= self.cfg.replan_below:
            obs = {k: np.stack([f[k] for f in self.history]) for k in self.keys}
            if self.prompt is not None:
                obs["prompt"] = self.prompt
            self._pending = (self._submit(obs), self.step, time.perf_counter())
        guess = self.last is None and self.stop_action is None and not self.stop_zeroes.any()  # see the module doc
        if self._left() == 0 and self._pending is not None:
            deadline = max(0.0, self.cfg.deadline_s() - (time.perf_counter() - start))
            try:
                # a failed request is _adopt's to report: the robot gets its stop action first
                self._pending[0].exception(timeout=self._timeout_left() if guess else min(deadline, self._timeout_left()))
                self._adopt()
            except FutureTimeout:
                if guess or self._timeout_left() == 0:  # a guess waited out all of timeout_ms (to within the clock's grain)
                    self._hung()
        if guess and self._failure:
            self._raise_failure()  # nothing sent yet, and no stop action to send
        late = self._left() == 0
        stop = self._failure is not None or self.cfg.on_late == "stop"
        if not late:
            action = np.clip(self.chunk[self.step - self.chunk_step], self.low, self.high)
        elif self.last is None or stop:
            action = self.stop_command()
        else:
            action = self.last
        sent = time.perf_counter()
        self.records.append({"episode": self.episode, "step": self.step, "sent": sent, "wait_ms": (sent - start) * 1e3, "late": late})
        self.last = action
        self.step += 1
        return {"actions": action}


    def stop_command(self) -> np.ndarray | None:
        """The stop action (see the module doc); None under position control before the first target was sent, where
        no action holds the robot where it is."""
        if self.stop_action is not None:
            return np.clip(self.stop_action, self.low, self.high)
        if self.last is None and not self.stop_zeroes.any():
            return None
        base = self.last if self.last is not None else np.zeros_like(self.low)
        return np.clip(np.where(self.stop_zeroes, 0.0, base), self.low, self.high).astype(np.float32)


class EpisodeProgress(openpi_subscriber.Subscriber):
    """A progress bar over episodes."""

    def __init__(self, episodes: int):
        self.bar = tqdm(total=episodes, desc="control", unit="ep")

    def on_episode_start(self) -> None:
        pass

    def on_step(self, observation: dict, action: dict) -> None:
        pass

    def on_episode_end(self) -> None:
        self.bar.update(1)


class ManiSkillRobot(openpi_environment.Environment):
    """The simulator as the robot: one env of the `VecEnv` convention (a ManiSkill task, run to its time
    limit, or the AGV warehouse, whose episodes end at the goal or a collision), episode k reset with seed
    `seed + k` (as `robodistill eval` does)."""

    def __init__(self, env: VecEnv, seed: int = 0):
        self.env, self.seed = env, seed
        self.episodes: list[dict] = []
        self.steps = 0
        self._next = 0
        self._obs: dict | None = None
        self._done = False

    def reset(self) -> None:
        self._seed = self.seed + self._next
        self._next += 1
        self._obs = self.env.reset(seed=self._seed)
        self._done = False

    def get_observation(self) -> dict:
        return {k: v[0].cpu().numpy() for k, v in self._obs.items()}

    def apply_action(self, action: dict) -> None:
        obs, _, terminated, truncated, info = self.env.step(np.asarray(action["actions"], np.float32)[None])
        self._obs = obs
        self.steps += 1
        if bool((terminated | truncated)[0]):
            self.episodes.append({"episode": len(self.episodes), "seed": self._seed, **episode_metrics(info, 0)})
            self._done = True

    def is_episode_complete(self) -> bool:
        return self._done


@dataclass
class ControlConfig:
    """`robodistill control` (configs/control.yaml)."""

    bundle: str | None = None  # a bundle directory: served from this process on a free loopback port
    server: str | None = None  # or a running server, ws://host:port (robodistill serve, or openpi's)
    api_key: str | None = None  # for server=; default: the ROBODISTILL_API_KEY env var
    robot: str = "maniskill"  # the simulator as the robot (the only adapter shipped; see ManiSkillRobot)
    task: str | None = None  # the task the policy must drive (a check); default: the bundle's
    max_episode_steps: int | None = None  # default: the bundle's
    episodes: int = 10
    seed: int = 0  # episode k is reset with seed + k; a bundle= server draws its noise from this seed
    hz: float | None = None  # default: the bundle's control_freq, the rate it was trained at; see ControllerConfig for these five
    replan_below: int = 0
    deadline_ms: float | None = None
    on_late: str = "hold"
    timeout_ms: float = 2000.0
    prompt: str | None = None  # a VLA bundle: the instruction sent with every request (default: the bundle's task)
    name: str = "control"


def _percentiles(values: list[float], qs=(50, 99)) -> list[float]:
    return [float(np.percentile(values, q)) for q in qs] if values else [float("nan")] * len(qs)


def timing_summary(agent: ChunkAgent, cfg: ControllerConfig) -> dict:
    """Loop periods are the times between consecutive actions leaving the agent (what the robot
    sees); the robot's own step time only shortens the sleep, as long as it fits in a period."""
    sent = np.asarray([r["sent"] for r in agent.records])
    episode = np.asarray([r["episode"] for r in agent.records])
    periods = (np.diff(sent)[np.diff(episode) == 0] * 1e3).tolist()
    rtt = [r["round_trip_ms"] for r in agent.requests]
    server = [r["server_ms"] for r in agent.requests if np.isfinite(r["server_ms"])]
    out = {
        "hz": cfg.hz, "steps": len(agent.records), "late_steps": sum(r["late"] for r in agent.records),
        "deadline_ms": cfg.deadline_s() * 1e3, "on_late": cfg.on_late, "requests": len(agent.requests),
        "skipped_actions": sum(r["skipped"] for r in agent.requests),
        "period_ms_p50_p99": _percentiles(periods), "wait_ms_p50_p99": _percentiles([r["wait_ms"] for r in agent.records]),
        "round_trip_ms_p50_p99": _percentiles(rtt), "server_infer_ms_p50_p99": _percentiles(server),
    }
    if cfg.hz > 0 and periods:
        jitter = np.abs(np.asarray(periods) - 1e3 / cfg.hz)
        out["jitter_ms_p50_p99_max"] = [*_percentiles(jitter.tolist()), float(jitter.max())]
    return out


def timing_table(t: dict) -> str:
    lines = []
    p50, p99 = t["period_ms_p50_p99"]
    if "jitter_ms_p50_p99_max" in t:
        j = t["jitter_ms_p50_p99_max"]
        lines.append(f"{'loop':<16} {t['hz']:g} Hz: period p50 {p50:.2f} ms, p99 {p99:.2f} ms; "
                     f"jitter p50 {j[0]:.2f} ms, p99 {j[1]:.2f} ms, max {j[2]:.2f} ms")
        if kept_hz(t):  # a period is the step's wait for its action, then the robot's step: the longer one is why
            wait = t["wait_ms_p50_p99"][0]
            why = (f"its steps wait p50 {wait:.1f} ms for the policy's actions (deadline_ms {t['deadline_ms']:g}); lower hz=, "
                   "or a deadline_ms= within a period, so that a late step holds instead" if wait > p50 - wait else
                   "the robot's step takes longer than a period; lower hz=")
            lines.append(f"{'':<16} it kept {kept_hz(t):.0f} Hz, not {t['hz']:g}: {why}")
    else:
        lines.append(f"{'loop':<16} unpaced: period p50 {p50:.2f} ms, p99 {p99:.2f} ms")
    lines.append(f"{'deadline misses':<16} {t['late_steps']} of {t['steps']} steps (deadline {t['deadline_ms']:.1f} ms, "
                 f"on_late={t['on_late']}); {t['skipped_actions']} stale actions skipped")
    r, s = t["round_trip_ms_p50_p99"], t["server_infer_ms_p50_p99"]
    lines.append(f"{'inference':<16} {t['requests']} requests: round trip p50 {r[0]:.2f} ms, p99 {r[1]:.2f} ms; "
                 f"server graph p50 {s[0]:.2f} ms, p99 {s[1]:.2f} ms")
    return "\n".join(lines)


def main(cfg: DictConfig) -> EvalReport:
    from hydra.core.hydra_config import HydraConfig

    from robodistill.deploy.server import PolicyServer
    from robodistill.policies.bundle import FORMAT, Bundle

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if bool(cfg.bundle) == bool(cfg.server):
        raise UserError("give exactly one of bundle=<dir> (served from this process) or server=ws://host:port")
    if cfg.robot != "maniskill":
        raise UserError(f"robot='{cfg.robot}' is not an adapter here; robot=maniskill (see ManiSkillRobot for a real arm)")
    if cfg.episodes < 1:
        raise UserError(f"episodes must be >= 1, got {cfg.episodes}")
    check_seed(cfg.seed)
    if cfg.max_episode_steps is not None and cfg.max_episode_steps < 1:  # 0 fell back to the bundle's limit unsaid
        raise UserError(f"max_episode_steps={cfg.max_episode_steps} must be >= 1 (or left out: the bundle's own limit)")
    # openpi's client and runtime and the websockets server log every connection and episode at INFO.
    for log in (logging.getLogger(), logging.getLogger("websockets")):
        log.setLevel(logging.WARNING)
    server = None
    api_key = cfg.api_key or os.environ.get(API_KEY_ENV)
    if cfg.bundle:
        server = PolicyServer(Bundle.load(cfg.bundle), port=0, api_key=api_key, seed=int(cfg.seed)).start()
    url = server.url if server else str(cfg.server)
    policy = connect(url, api_key)
    meta = policy.get_server_metadata()
    if meta.get("format") != FORMAT:  # another format's fields are other fields: KeyError's traceback, below
        said = ("no robodistill bundle metadata, which control takes the robot's observation keys, action bounds and env "
                "from: serve a bundle with `robodistill serve bundle=<dir>`" if meta.get("format") is None else
                f"the metadata of a {meta['format']} bundle (robodistill {meta.get('robodistill_version', '?')}); this "
                f"robodistill ({robodistill.__version__}) reads {FORMAT}: run the same version on both sides")
        raise UserError(f"the server at {url} sent {said}")
    e = meta["env"]
    hz = float(e["control_freq"]) if cfg.hz is None else float(cfg.hz)
    controller = ControllerConfig(hz, int(cfg.replan_below), cfg.deadline_ms, str(cfg.on_late), float(cfg.timeout_ms))
    controller.check(int(meta["action"]["chunk_length"]))
    if cfg.task and cfg.task != e["task"]:
        raise UserError(f"task={cfg.task}, but the policy drives {e['task']}: drop task= or serve a bundle for {cfg.task}")
    env_cfg = EnvConfig(task=e["task"], obs_mode=e["obs_mode"], control_mode=e["control_mode"], num_envs=1,
                        max_episode_steps=cfg.max_episode_steps or e["max_episode_steps"], image_size=e.get("image_size", 128),
                        scene=e.get("scene"))
    agent = ChunkAgent(policy, meta, controller, cfg.prompt)
    start = time.perf_counter()
    stopped = None
    with make_env(env_cfg, ignore_terminations=True) as env:
        robot = ManiSkillRobot(env, seed=int(cfg.seed))
        progress = EpisodeProgress(int(cfg.episodes))
        try:
            Runtime(robot, agent, [progress], max_hz=controller.hz, num_episodes=int(cfg.episodes)).run()
        except UserError as err:  # a server hung or gone: the steps up to it are what diagnose it, so they are saved
            stopped = err
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the robot stops where it is, and the run is kept as for a failure
            stopped = KeyboardInterrupt("interrupted")
            halt = agent.stop_command()
            if halt is not None:
                robot.apply_action({"actions": halt})
        progress.bar.close()
    if server is not None:
        server.stop()
    report = EvalReport(robot.episodes, time.perf_counter() - start, robot.steps)
    timing = timing_summary(agent, controller)
    telemetry = io.StringIO()  # written atomically: a full disk is one line, not a traceback and a cut-short table
    writer = csv.DictWriter(telemetry, fieldnames=["episode", "step", "sent", "wait_ms", "late"])
    writer.writeheader()
    writer.writerows(agent.records)
    checkpoints.write_atomic(run_dir / "telemetry.csv", lambda f: f.write(telemetry.getvalue().encode()))
    report.save(run_dir / "control.json", env=env_cfg.__dict__, server=url, bundle=cfg.bundle,
                controller=asdict(controller), timing=timing, requests=agent.requests,
                stopped=None if stopped is None else str(stopped))
    if isinstance(stopped, KeyboardInterrupt):
        sent = "the robot was sent its stop action" if halt is not None else "no action was sent (nothing to hold yet)"
        raise KeyboardInterrupt(f"{sent}; the run up to it is saved in {run_dir}")  # said as the CLI's one line
    if stopped is not None:
        raise UserError(f"{stopped}; the run up to it is saved in {run_dir}") from stopped
    print(report.table(f"{e['task']} through {url} at {controller.hz:g} Hz ({counted(report.summary['episodes'], 'episode')}, seed {cfg.seed})"))
    print(timing_table(timing))
    print(f"run: {run_dir}")
    return report
