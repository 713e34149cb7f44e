"""The AGV warehouse as a gymnasium env (one robot) and as a `VecEnv`-convention batch (many robots).

Episodes end at the goal (terminated, success), on a collision (terminated, penalty) or at the
scene's time limit (truncated). Unlike ManiSkill tasks they always end early on success or
collision, also in evaluation: after a crash there is nothing left to evaluate.
"""

from __future__ import annotations

from dataclasses import replace

import gymnasium as gym
import numpy as np
import torch

from robodistill.envs.agv.batch import DT, EPISODE_METRICS, OBS_DIM, AGVBatch, Rewards
from robodistill.envs.agv.render import render
from robodistill.envs.agv.scenes import get_scene
from robodistill.envs.factory import AGV_TASK as TASK
from robodistill.errors import UserError

REWARD_MODES = {"sparse": Rewards(), "dense": Rewards(shaping=0.1)}
DEFAULT_SCENE = "complex_dynamic"
# What an episode in progress is (AGVBatch's arrays): its layout, movers, pose, velocity, clock and running totals.
EPISODE_STATE = ("rects", "goal", "mover_a", "mover_b", "mover_speed", "mover_phase", "pos", "theta", "v", "w", "t", "ret", "path")


# Made anew for each env: a space holds a random generator (`seed`, `sample`), and one shared by every env made in a
# process let seeding one env's space reseed all the others.
def observation_space() -> gym.spaces.Box:
    return gym.spaces.Box(-np.inf, np.inf, (OBS_DIM,), np.float32)


def action_space() -> gym.spaces.Box:
    return gym.spaces.Box(-1.0, 1.0, (2,), np.float32)


def make_batch(scene: str, num: int, reward_mode: str | None = None, max_episode_steps: int | None = None,
               collision_penalty: float | None = None) -> AGVBatch:
    mode = reward_mode or "sparse"
    if mode not in REWARD_MODES:
        raise UserError(f"unknown reward_mode '{mode}' for {TASK} (env.reward_mode). Valid: {', '.join(REWARD_MODES)}")
    rewards = REWARD_MODES[mode]
    if collision_penalty is not None:
        if not collision_penalty >= 0:
            raise UserError(f"env.collision_penalty must be >= 0 (a collision's reward is minus it), got {collision_penalty}")
        rewards = replace(rewards, collision=-float(collision_penalty))
    if num < 1:
        raise UserError(f"env.num_envs must be >= 1, got {num}")
    if max_episode_steps is not None and max_episode_steps < 1:  # 0 truncated every episode after its first step
        raise UserError(f"env.max_episode_steps must be >= 1 (or null: the scene's own limit), got {max_episode_steps}")
    spec = get_scene(scene)
    if max_episode_steps is not None:
        spec = replace(spec, max_steps=int(max_episode_steps))
    return AGVBatch(spec, num, rewards)


class AGVWarehouseEnv(gym.Env):
    """One AGV; `gym.make("robodistill/AGVWarehouse-v0", scene="simple_static")`.

    Every step's `info` holds the episode's metrics so far (EPISODE_METRICS), as ManiSkill's envs
    report `success` every step: the key "episode" stays free for gymnasium's
    RecordEpisodeStatistics and SB3's Monitor, and an episode that gymnasium's TimeLimit cuts
    (`gym.make(..., max_episode_steps=N)`, which only ever shortens the scene's own limit) still ends
    with its metrics, `time_to_goal` censored at N (TakeTimeLimit).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": int(round(1 / DT))}

    def __init__(self, scene: str = DEFAULT_SCENE, reward_mode: str | None = None, max_episode_steps: int | None = None,
                 render_mode: str | None = None, render_size: int = 256, collision_penalty: float | None = None):
        self.batch = make_batch(scene, 1, reward_mode, max_episode_steps, collision_penalty)
        self.observation_space, self.action_space = observation_space(), action_space()
        self.render_mode, self.render_size = render_mode, render_size

    def reset(self, *, seed: int | None = None, options=None):
        unseeded = seed is None and self._np_random is None
        super().reset(seed=seed)
        if unseeded:
            # Gymnasium seeds a never-seeded env from the OS: copies made without a seed (gym.make_vec, SB3's
            # make_vec_env) must not all drive the same layouts, as the batch's default generator (seed 0) would.
            seed = int(self.np_random.integers(2**63))
        self.batch.reset(np.array([0]), [seed])
        return self.batch.observe()[0], {}

    def step(self, action):
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (2,):
            raise ValueError(f"the AGV's action has shape (2,), a linear and an angular command in [-1, 1]; got {action.shape}")
        reward, terminated, truncated, episode = self.batch.step(action[None])
        info = {k: v[0].item() for k, v in episode.items()}
        return self.batch.observe()[0], float(reward[0]), bool(terminated[0]), bool(truncated[0]), info

    def render(self):
        return render(self.batch, self.render_size)[0]


class TakeTimeLimit(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Gives the AGV env the episode limit of the TimeLimit it wraps, where that is the shorter: gymnasium keeps
    `gym.make`'s max_episode_steps from the env, which then censored `time_to_goal` of the episodes the TimeLimit cut
    at the scene's limit (20 s for an episode cut at 0.7 s). The registration lists it in additional_wrappers, which
    `gym.make` applies over its TimeLimit."""

    def __init__(self, env: gym.Env):
        gym.utils.RecordConstructorArgs.__init__(self)
        super().__init__(env)
        limit = env.spec.max_episode_steps if env.spec is not None else None
        batch = env.unwrapped.batch
        if limit is not None and limit < batch.max_steps:
            batch.max_steps = limit


class AGVVecEnv:
    """`cfg.num_envs` robots behind the `robodistill.envs.VecEnv` convention (torch out, same-step
    auto-reset, `final_info["episode"]`), so `evaluate()` and the trainers treat it like any env."""

    def __init__(self, cfg, render: bool = False):
        if cfg.obs_mode != "state":
            raise UserError(f"env.obs_mode={cfg.obs_mode}: {TASK} observes lidar ranges, the goal and its own velocity "
                            "(env.obs_mode=state); for pictures, eval's video=true renders it")
        self.cfg = cfg
        self.batch = make_batch(cfg.scene or DEFAULT_SCENE, cfg.num_envs, cfg.reward_mode, cfg.max_episode_steps, cfg.collision_penalty)
        self.num_envs = cfg.num_envs
        self.device = torch.device("cpu")
        self.single_observation_space = gym.spaces.Dict({"state": observation_space()})
        self.single_action_space = action_space()
        self.action_low = torch.as_tensor(self.single_action_space.low)
        self.action_high = torch.as_tensor(self.single_action_space.high)
        self.max_episode_steps = self.batch.max_steps
        self.control_freq = int(round(1 / DT))
        self._render = render
        self.batch.reset(np.arange(self.num_envs))

    def reset(self, seed: int | list[int] | None = None, rebuild: bool = False) -> dict[str, torch.Tensor]:
        """`rebuild` is VecEnv's; nothing here carries from one episode into the next, so there is nothing to rebuild."""
        if isinstance(seed, int):
            seed = [seed + i for i in range(self.num_envs)]
        self.batch.reset(np.arange(self.num_envs), seed)
        return {"state": torch.from_numpy(self.batch.observe())}

    def step(self, action, render: bool = False):
        """As `VecEnv.step`: `render` puts every robot's frame of the state the step reached, before the auto-reset,
        in `info["frames"]`."""
        action = action.detach().cpu().numpy() if isinstance(action, torch.Tensor) else np.asarray(action)
        reward, terminated, truncated, episode = self.batch.step(action.astype(np.float64))
        done = terminated | truncated
        info: dict = {"frames": self.render()} if render else {}
        if done.any():
            final_obs = self.batch.observe()
            self.batch.reset(np.flatnonzero(done))
            info |= {
                "_final_info": torch.from_numpy(done),
                "final_observation": {"state": torch.from_numpy(final_obs)},
                "final_info": {"episode": {k: torch.from_numpy(np.asarray(episode[k])) for k in EPISODE_METRICS}},
            }
        obs = {"state": torch.from_numpy(self.batch.observe())}
        return obs, torch.from_numpy(reward), torch.from_numpy(terminated), torch.from_numpy(truncated), info

    def state(self) -> dict:
        """Every robot's episode as it stands, its generator included (tensors and plain containers, as a checkpoint holds
        them): a training run resumed with `load_state` goes on in the episodes it was in, not in fresh ones."""
        return {**{k: torch.from_numpy(getattr(self.batch, k).copy()) for k in EPISODE_STATE},
                "rngs": [rng.bit_generator.state for rng in self.batch.rngs]}

    def load_state(self, state: dict) -> dict[str, torch.Tensor]:
        """Put back what `state` returned (for as many robots); returns their observation."""
        for k in EPISODE_STATE:
            setattr(self.batch, k, state[k].numpy().copy())
        for rng, saved in zip(self.batch.rngs, state["rngs"]):
            rng.bit_generator.state = saved
        return {"state": torch.from_numpy(self.batch.observe())}

    def render(self) -> np.ndarray:
        if not self._render:
            raise UserError("this AGV env was made without render=True; videos need make_env(..., render=True)")
        return render(self.batch, self.cfg.render_size)

    def close(self) -> None:
        """Nothing to release: the robots are numpy arrays in this process (no simulator, no workers)."""

    def __enter__(self) -> "AGVVecEnv":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
