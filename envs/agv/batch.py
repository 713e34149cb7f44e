"""B differential-drive AGVs stepped together in numpy: one call moves, senses and scores every robot.

Each robot has its own layout and its own random generator, so robot i of a batch behaves exactly
like a lone robot reset with the same seed (tests/test_agv.py checks this).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from robodistill.envs.agv.scenes import MOVER_RADIUS, ROBOT_RADIUS, Scene, generate

DT = 0.1  # s; 10 Hz control
# An action of +1 commands V_MAX and W_MAX, -1 commands V_REVERSE and -W_MAX: AGVs mostly drive forward
# and only back off slowly, which also means an untrained policy wanders instead of dithering in place.
V_MAX, V_REVERSE, W_MAX = 1.0, -0.3, 2.0  # m/s, m/s, rad/s
A_MAX, ALPHA_MAX = 2.0, 6.0  # m/s^2, rad/s^2: commands are reached no faster than this
# The action that commands standstill (v = 0, w = 0): what a controller sends when no fresh action arrives.
STOP_ACTION = (2 * (0.0 - V_REVERSE) / (V_MAX - V_REVERSE) - 1, 0.0)
RAYS = 16
RAY_RANGE = 4.0  # m
GOAL_RADIUS = 0.5  # m
OBS_DIM = RAYS + 5  # rays, goal distance, sin/cos of goal bearing, own linear and angular velocity
EPISODE_METRICS = ("success_once", "collision", "return", "episode_len", "path_length", "time_to_goal")


@dataclass(frozen=True)
class Rewards:
    goal: float = 1.0
    collision: float = -1.0
    shaping: float = 0.0  # reward per metre of progress towards the goal; 0 keeps the reward sparse


def ray_box_distances(origin: np.ndarray, dirs: np.ndarray, rects: np.ndarray, max_range: float) -> np.ndarray:
    """Slab test: distance along each ray to the nearest rectangle, capped at max_range.

    origin (B, 2), dirs (B, R, 2) unit vectors, rects (B, K, 4) -> (B, R).
    """
    # A ray parallel to an axis gets a tiny component instead of 0: no inf * 0 = nan, same distances.
    safe = np.where(np.abs(dirs) < 1e-12, 1e-12, dirs)
    inv = 1.0 / safe[:, :, None, :]  # (B, R, 1, 2)
    o = origin[:, None, None, :]
    t1 = (rects[:, None, :, :2] - o) * inv
    t2 = (rects[:, None, :, 2:] - o) * inv
    near = np.minimum(t1, t2).max(axis=-1)
    far = np.maximum(t1, t2).min(axis=-1)
    hit = (far >= np.maximum(near, 0.0))
    dist = np.where(hit, np.maximum(near, 0.0), max_range)
    return np.minimum(dist.min(axis=-1), max_range)


def ray_circle_distances(origin: np.ndarray, dirs: np.ndarray, centres: np.ndarray, radius: float, max_range: float) -> np.ndarray:
    """origin (B, 2), dirs (B, R, 2), centres (B, M, 2) -> (B, R) distance to the nearest circle."""
    oc = centres[:, None, :, :] - origin[:, None, None, :]  # (B, 1, M, 2)
    proj = (oc * dirs[:, :, None, :]).sum(-1)  # (B, R, M)
    disc = radius**2 - ((oc**2).sum(-1) - proj**2)
    t = proj - np.sqrt(np.maximum(disc, 0.0))
    dist = np.where((disc >= 0) & (proj > 0), np.maximum(t, 0.0), max_range)
    return np.minimum(dist.min(axis=-1), max_range)


class AGVBatch:
    """The simulation of `num` robots in one scene. Actions (B, 2) in [-1, 1]: linear, angular command."""

    def __init__(self, scene: Scene, num: int, rewards: Rewards = Rewards()):
        self.scene, self.num, self.rewards = scene, num, rewards
        self.max_steps = scene.max_steps
        k, m = scene.slots, scene.movers
        self.rngs = [np.random.default_rng(i) for i in range(num)]
        self.rects = np.zeros((num, k, 4))
        self.goal = np.zeros((num, 2))
        self.mover_a, self.mover_b = np.zeros((num, m, 2)), np.zeros((num, m, 2))
        self.mover_speed, self.mover_phase = np.zeros((num, m)), np.zeros((num, m))
        self.pos, self.theta = np.zeros((num, 2)), np.zeros(num)
        self.v, self.w = np.zeros(num), np.zeros(num)
        self.t = np.zeros(num, dtype=np.int64)
        self.ret, self.path = np.zeros(num), np.zeros(num)
        self.ray_angles = np.linspace(-np.pi, np.pi, RAYS, endpoint=False)

    def reset(self, ids: np.ndarray, seeds: list[int | None] | None = None) -> None:
        """New episodes for robots `ids`; a seed restarts that robot's generator, None continues it."""
        for j, i in enumerate(ids):
            if seeds is not None and seeds[j] is not None:
                self.rngs[i] = np.random.default_rng(seeds[j])
            lay = generate(self.rngs[i], self.scene)
            self.rects[i], self.goal[i], self.pos[i], self.theta[i] = lay.rects, lay.goal, lay.start, lay.heading
            self.mover_a[i], self.mover_b[i] = lay.mover_a, lay.mover_b
            self.mover_speed[i], self.mover_phase[i] = lay.mover_speed, lay.mover_phase
        self.v[ids] = self.w[ids] = self.ret[ids] = self.path[ids] = 0.0
        self.t[ids] = 0

    def movers(self) -> np.ndarray:
        """Mover centres (B, M, 2): back and forth along a -> b, `phase` metres into the loop."""
        length = np.linalg.norm(self.mover_b - self.mover_a, axis=-1)
        s = np.mod(self.mover_phase + self.mover_speed * self.t[:, None] * DT, 2 * length)
        frac = np.where(s < length, s, 2 * length - s) / length
        return self.mover_a + frac[..., None] * (self.mover_b - self.mover_a)

    def goal_distance(self) -> np.ndarray:
        return np.linalg.norm(self.goal - self.pos, axis=-1)

    def observe(self) -> np.ndarray:
        angles = self.theta[:, None] + self.ray_angles
        dirs = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
        rays = ray_box_distances(self.pos, dirs, self.rects, RAY_RANGE)
        if self.scene.movers:
            rays = np.minimum(rays, ray_circle_distances(self.pos, dirs, self.movers(), MOVER_RADIUS, RAY_RANGE))
        to_goal = self.goal - self.pos
        bearing = np.arctan2(to_goal[:, 1], to_goal[:, 0]) - self.theta
        goal = np.stack([self.goal_distance() / self.scene.size, np.sin(bearing), np.cos(bearing)], axis=-1)
        vel = np.stack([self.v / V_MAX, self.w / W_MAX], axis=-1)
        return np.concatenate([rays / RAY_RANGE, goal, vel], axis=-1).astype(np.float32)

    def collided(self) -> np.ndarray:
        closest = np.clip(self.pos[:, None, :], self.rects[:, :, :2], self.rects[:, :, 2:])
        hit = (np.linalg.norm(self.pos[:, None, :] - closest, axis=-1) < ROBOT_RADIUS).any(axis=-1)
        if self.scene.movers:
            gap = np.linalg.norm(self.movers() - self.pos[:, None, :], axis=-1)
            hit |= (gap < ROBOT_RADIUS + MOVER_RADIUS).any(axis=-1)
        return hit

    def step(self, action: np.ndarray):
        """Advance every robot by DT. Returns reward, terminated, truncated and the episode metrics
        of every robot (meaningful for the finished ones), before any reset."""
        if action.shape != (self.num, 2):
            raise ValueError(f"AGV actions have shape ({self.num}, 2), a linear and an angular command in [-1, 1] per robot; got {action.shape}")
        if not np.isfinite(action).all():  # a NaN would become the robot's pose and reward without a word
            raise ValueError(f"AGV actions must be finite, got {action[~np.isfinite(action).all(1)][0]}")
        a = np.clip(action, -1.0, 1.0)
        v_cmd = V_REVERSE + (a[:, 0] + 1.0) * 0.5 * (V_MAX - V_REVERSE)
        self.v += np.clip(v_cmd - self.v, -A_MAX * DT, A_MAX * DT)
        self.w += np.clip(a[:, 1] * W_MAX - self.w, -ALPHA_MAX * DT, ALPHA_MAX * DT)
        before = self.goal_distance()
        self.theta = np.mod(self.theta + self.w * DT + np.pi, 2 * np.pi) - np.pi
        self.pos += (self.v * DT)[:, None] * np.stack([np.cos(self.theta), np.sin(self.theta)], axis=-1)
        self.path += np.abs(self.v) * DT
        self.t += 1
        after = self.goal_distance()
        collision = self.collided()
        success = (after < GOAL_RADIUS) & ~collision
        reward = self.rewards.shaping * (before - after)
        reward += np.where(success, self.rewards.goal, 0.0) + np.where(collision, self.rewards.collision, 0.0)
        self.ret += reward
        terminated = success | collision
        truncated = ~terminated & (self.t >= self.max_steps)
        episode = {
            "success_once": success,
            "collision": collision,
            "return": self.ret.copy(),
            "episode_len": self.t.copy(),
            "path_length": self.path.copy(),
            # Censored at the time limit when the goal is not reached, so the mean stays defined.
            "time_to_goal": np.where(success, self.t, self.max_steps) * DT,
        }
        return reward.astype(np.float32), terminated, truncated, episode
