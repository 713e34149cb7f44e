"""The one vectorized-env convention everything downstream uses, and its stable-baselines3 view.

Convention (ManiSkill's own `ManiSkillVectorEnv` conventions, whatever the backend):
- observations are a dict of batched torch tensors on `env.device`: `state` (B, D) float32 always,
  `rgb` (B, H, W, 3 * cameras) uint8 when obs_mode=rgb;
- `step` returns torch tensors `reward` (B,), `terminated` (B,), `truncated` (B,) and `info`;
- finished envs reset at once (same step); for them `info["_final_info"]` is True,
  `info["final_observation"]` holds the last observation and `info["final_info"]["episode"]` the
  episode metrics `success_once`, `success_at_end` (with ignore_terminations), `return`, `episode_len`;
- `render()` gives every env's frame of its current state, (B, H, W, 3) uint8; `step(action, render=True)` adds
  `info["frames"]`, those of the state the step reached, rendered before the auto-reset: a video ends on the last state.
"""

from __future__ import annotations

import signal
import time
from collections import deque
from contextlib import contextmanager
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3.common.vec_env.base_vec_env import VecEnv as SB3VecEnv

from robodistill.errors import CutShort

Obs = dict[str, torch.Tensor]
# What gymnasium's AsyncVectorEnv raises when a worker process is gone (a simulator crash, the out-of-memory killer):
# its pipe at end of file, from deep inside the step, and again from every later close.
WORKER_GONE = (EOFError, BrokenPipeError, ConnectionResetError)


class StateDictObservation(gym.ObservationWrapper):
    """obs_mode=state: the flat state vector becomes `{"state": vector}`."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        base = env.unwrapped
        base.update_obs_space({"state": base._init_raw_obs})

    def observation(self, observation):
        return {"state": observation}


def single_env(env: gym.Env, rgb: bool) -> gym.Env:
    """Apply the observation convention to a ManiSkill env made by `gym.make`."""
    if rgb:
        from mani_skill.utils.wrappers.flatten import FlattenRGBDObservationWrapper

        return FlattenRGBDObservationWrapper(env, rgb=True, depth=False, state=True)
    return StateDictObservation(env)


class Filmed(gym.Wrapper):
    """While `filming`, each step renders the state it reached into `frame`, inside the step: the vector env above
    resets an episode that ended before its step returns, so a frame rendered after the step never shows that
    episode's last state (ManiSkill's RecordEpisode films below the reset for the same reason). Not filming, it
    renders nothing."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.filming = False
        self.frame = None

    def step(self, action):
        out = self.env.step(action)
        self.frame = self.env.render() if self.filming else None
        return out


# The seeds auto-reset episodes of env worker processes start from: above every seed robodistill resets with on purpose
# (`demos` from 0, the trainers' evaluations from HELD_OUT_SEEDS = 10,000, benchmarks' from 50,000, agv-train's from
# 1,000,000, rl100's blocks up to 4,000,000,000), so that no training episode starts from an initial state an
# evaluation rates; under 2 ** 32, the largest seed ManiSkill's numpy generators take.
AUTO_RESET_SEEDS = (4_000_000_000, 2**32)


class SeededAutoReset(gym.Wrapper):
    """Seeds every episode of a worker env: a reset given a seed with it, an auto-reset (none given) with one drawn
    from AUTO_RESET_SEEDS by a generator the last seed given restarts (repeatable: the same seeds, the same draws).
    Left to ManiSkill, an auto-reset draws its episode's seed in [0, 2 ** 31), where evaluations rate: ~10% of 10^6
    training episodes would start from one of 200 rated initial states."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.draws = np.random.default_rng(0)  # a worker never given a seed draws as one given 0 would

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is None:
            seed = int(self.draws.integers(*AUTO_RESET_SEEDS))
        else:
            self.draws = np.random.default_rng(seed)
        return self.env.reset(seed=seed, options=options)


def _frames(x) -> np.ndarray:
    """Frames as numpy: ManiSkill's batched envs render torch tensors (on the GPU with physx_cuda)."""
    return x.cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _to_torch(x: Any, device: torch.device) -> Any:
    if isinstance(x, dict):
        return {k: _to_torch(v, device) for k, v in x.items()}
    if isinstance(x, np.ndarray) and x.dtype != object:
        return torch.from_numpy(x).to(device)
    if isinstance(x, (bool, int, float, np.number, np.bool_)):
        return torch.as_tensor(x, device=device)
    return x


def _stack_final_obs(final_obs: np.ndarray, current: Obs) -> Obs:
    """gymnasium gives the last observation of each finished env as an object array of dicts."""
    out = {k: v.clone() for k, v in current.items()}
    for i, obs in enumerate(final_obs):
        if obs is not None:
            for k in out:
                out[k][i] = torch.as_tensor(obs[k])
    return out


def how_it_ended(exitcode: int) -> str:
    """How a worker process ended, by its exit code, with the usual cause."""
    if exitcode >= 0:
        return f"exited with code {exitcode}"
    name = signal.Signals(-exitcode).name
    causes = {"SIGKILL": "the out-of-memory killer, or a kill -9", "SIGSEGV": "a crash in the simulator"}
    return f"was ended by {name}" + (f" ({causes[name]})" if name in causes else "")


class VecEnv:
    """A batch of ManiSkill envs behind the convention above.

    Wraps `ManiSkillVectorEnv` (GPU, or one CPU env) or gymnasium's `AsyncVectorEnv` of
    `CPUGymWrapper` workers (several CPU envs), the ManiSkill env (or each worker's) under a `Filmed` wrapper;
    `make_env` picks.
    """

    def __init__(self, vec: gym.vector.VectorEnv, cfg, observation=None, filmed: Filmed | None = None):
        self._vec = vec
        self._filmed = filmed  # batched: the one Filmed env below `vec`; the workers' are reached through `vec`
        self._filming = False
        self.cfg = cfg
        self._observation = observation  # batched: the convention's wrapper, raw ManiSkill observation -> ours
        self.num_envs: int = vec.num_envs
        self.batched = not isinstance(vec, gym.vector.AsyncVectorEnv)
        self.device = vec.device if self.batched else torch.device("cpu")
        self.single_observation_space: gym.spaces.Dict = vec.single_observation_space
        self.single_action_space: gym.spaces.Box = vec.single_action_space
        self.action_low = torch.as_tensor(self.single_action_space.low, device=self.device)
        self.action_high = torch.as_tensor(self.single_action_space.high, device=self.device)
        from robodistill.envs.factory import registered_episode_steps  # here: the factory imports this module

        self.max_episode_steps: int = cfg.max_episode_steps or registered_episode_steps(cfg.task)
        self.control_freq: int = int(vec.base_env.control_freq if self.batched else vec.get_attr("control_freq")[0])

    def reset(self, seed: int | list[int] | None = None, rebuild: bool = False) -> Obs:
        """`rebuild`: build the scene anew first. CPU PhysX carries solver state from one episode into the next,
        so an episode's outcome depends on what the env ran before as well as on its seed; after a rebuild, only
        on what follows (the same as in a fresh env). On physx_cuda it is skipped: rebuilding every parallel
        scene is slow there, and its determinism is not checked here."""
        rebuild = rebuild and self.cfg.sim_backend == "physx_cpu"
        with self._workers():
            obs, _ = self._vec.reset(seed=seed, options={"reconfigure": True} if rebuild else None)
        return obs if self.batched else _to_torch(obs, self.device)

    def step(self, action: torch.Tensor | np.ndarray, render: bool = False):
        """`render`: `info["frames"]` holds every env's frame of the state the step reached, (B, H, W, 3) uint8, that
        of an episode the step ended included, rendered before the auto-reset (needs `make_env(..., render=True)`).
        Without it, nothing is rendered."""
        self._film(render)
        if self.batched:
            action = torch.as_tensor(action, device=self.device, dtype=torch.float32)
            obs, reward, terminated, truncated, info = self._vec.step(action)
            if render:
                info["frames"] = _frames(self._filmed.frame)
            return obs, reward, terminated, truncated, info
        action = action.detach().cpu().numpy() if isinstance(action, torch.Tensor) else np.asarray(action)
        with self._workers():
            obs, reward, terminated, truncated, info = self._vec.step(action.astype(np.float32))
            frames = np.stack(self._vec.get_attr("frame")) if render else None
        obs = _to_torch(obs, self.device)
        if "final_info" in info:
            info["final_observation"] = _stack_final_obs(info.pop("final_obs"), obs)
        info = _to_torch(info, self.device)
        if render:
            info["frames"] = frames
        return obs, _to_torch(reward, self.device).float(), _to_torch(terminated, self.device), _to_torch(truncated, self.device), info

    def _film(self, on: bool) -> None:
        """Switch the envs' `Filmed` wrappers to `on`; the workers' only when it changes (a message to each)."""
        if on == self._filming:
            return
        if self.batched:
            self._filmed.filming = on
        else:
            with self._workers():
                self._vec.set_attr("filming", on)
        self._filming = on

    def sim_states(self) -> np.ndarray:
        """(B, S) float32: each env's full simulator state (ManiSkill's `get_state`: poses, velocities,
        controller targets), from which `observe_states` of another env of the same task rebuilds
        exactly what that env would observe here."""
        if self.batched:
            return self._vec.base_env.get_state().cpu().numpy().astype(np.float32)
        with self._workers():
            return np.concatenate([np.asarray(s) for s in self._vec.call("get_state")]).astype(np.float32)

    def observe_states(self, states: np.ndarray) -> Obs:
        """This env's observations (its obs_mode, camera) of the simulator states `states` (N, S), taken
        from `sim_states` of an env of the same task. Cameras render only here, so an env of the
        student's obs_mode can leave images to this one. Between setting the state and observing it,
        one physics step (undone) gives contacts to read: a grasp judged from them switches a frame early."""
        if not (self.batched and self.num_envs == 1):
            raise ValueError("observe_states needs an env with num_envs=1 (it sets one state at a time)")
        base = self._vec.base_env
        out = []
        for state in torch.as_tensor(states, device=self.device):
            base.set_state(state[None])
            base.scene.px.step()  # contacts to read (a grasp is judged from them), then back to the state itself
            base.set_state(state[None])
            out.append(self._observation(base.get_obs()))
        return {k: torch.cat([o[k] for o in out]) for k in out[0]}

    def render(self) -> np.ndarray:
        """RGB frames of every env, (B, H, W, 3) uint8 (needs `make_env(..., render=True)`)."""
        if self.batched:
            return _frames(self._vec.render())
        with self._workers():
            return np.stack(self._vec.call("render"))

    @contextmanager
    def _workers(self):
        """A call to the worker processes: one of them gone ends it in one line that says which and how, and the
        others are stopped (gymnasium's close would wait on the dead one's pipe, then raise again)."""
        try:
            yield
        except WORKER_GONE as err:
            processes = self._vec.processes
            deadline = time.monotonic() + 2  # its pipe closes as it dies: the exit code follows at once
            while all(p.exitcode is None for p in processes) and time.monotonic() < deadline:
                time.sleep(0.01)
            gone = [(i, p.pid, p.exitcode) for i, p in enumerate(processes) if p.exitcode is not None]
            for p in processes:
                if p.is_alive():
                    p.terminate()
                p.join()
            for pipe in self._vec.parent_pipes:
                pipe.close()
            self._vec.closed = True
            said = "; ".join(f"env worker {i} of {len(processes)} (pid {pid}) {how_it_ended(code)}" for i, pid, code in gone)
            raise CutShort(f"{said or 'an env worker process closed its pipe'} while running {self.cfg.task}; the other "
                           f"workers were stopped") from err

    def close(self) -> None:
        self._vec.close()

    def __enter__(self) -> "VecEnv":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SB3View(SB3VecEnv):
    """The same envs as a stable-baselines3 `VecEnv` (numpy in and out, SB3's info keys).

    Observations are a Box of the state vector for obs_mode=state and the Dict otherwise, so SB3's
    `MlpPolicy` and `MultiInputPolicy` both apply.
    """

    def __init__(self, env: VecEnv):
        self.env = env
        self._flat = set(env.single_observation_space.spaces) == {"state"}
        space = env.single_observation_space["state"] if self._flat else env.single_observation_space
        self.render_mode = None
        super().__init__(env.num_envs, space, env.single_action_space)
        self._seed: int | None = None
        self._actions: np.ndarray | None = None
        self.sim_log: deque[np.ndarray] | None = None

    def log_sim_states(self, keep: int) -> None:
        """From now on keep the simulator states (`VecEnv.sim_states`) of the last `keep` observations
        returned, oldest first, in `sim_log`: a teacher that sees another observation mode can be
        shown them later (RPD's `teacher_obs_mode`)."""
        self.sim_log = deque(maxlen=keep)

    def _log(self) -> None:
        if self.sim_log is not None:
            self.sim_log.append(self.env.sim_states())

    def to_numpy(self, obs: Obs):
        """A VecEnv observation as this view gives it to SB3."""
        if self._flat:
            return obs["state"].cpu().numpy()
        return {k: v.cpu().numpy() for k, v in obs.items()}

    def reset(self):
        obs = self.env.reset(seed=self._seed)
        self._seed = None
        self._log()
        return self.to_numpy(obs)

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = actions

    def step_wait(self):
        obs, reward, terminated, truncated, info = self.env.step(self._actions)
        self._log()
        done = (terminated | truncated).cpu().numpy()
        infos: list[dict] = [{} for _ in range(self.num_envs)]
        if done.any():
            # on the CPU at once: an element of a GPU tensor read per finished env is a transfer and a wait each
            cut = (truncated & ~terminated).cpu().numpy()
            final_obs = self.to_numpy(info["final_observation"])
            episode = {k: v.cpu().numpy() for k, v in info["final_info"].get("episode", {}).items()}
            for i in np.flatnonzero(done):
                infos[i]["terminal_observation"] = final_obs[i] if self._flat else {k: v[i] for k, v in final_obs.items()}
                infos[i]["TimeLimit.truncated"] = bool(cut[i])
                if episode:
                    infos[i]["episode"] = {"r": float(episode["return"][i]), "l": int(episode["episode_len"][i])}
                    if "success_once" in episode:
                        infos[i]["is_success"] = bool(episode["success_once"][i])
        return self.to_numpy(obs), reward.cpu().numpy(), done, infos

    def seed(self, seed: int | None = None):
        self._seed = seed
        return [seed] * self.num_envs

    def close(self) -> None:
        self.env.close()

    def get_attr(self, attr_name: str, indices=None) -> list[Any]:
        if attr_name == "render_mode":  # asked by SB3 at construction; frames come from VecEnv.render()
            return [None] * len(self._get_indices(indices))
        return [getattr(self.env, attr_name)] * len(self._get_indices(indices))

    def set_attr(self, attr_name: str, value: Any, indices=None) -> None:
        raise AttributeError(f"SB3View cannot set '{attr_name}' on ManiSkill envs")

    def env_method(self, method_name: str, *args, indices=None, **kwargs) -> list[Any]:
        raise AttributeError(f"SB3View has no per-env method '{method_name}'")

    def env_is_wrapped(self, wrapper_class, indices=None) -> list[bool]:
        return [False] * len(self._get_indices(indices))
