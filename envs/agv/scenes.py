"""The four warehouse scenes and their seeded procedural layouts.

Scaled down from Yin et al. (arXiv 2404.12594) so that learning fits a CPU budget: arenas of 8 m and
12 m instead of full warehouses, and episode limits of 1/10 of the paper's (2000 -> 200 simple,
3000 -> 300 complex static, 4000 -> 400 complex dynamic) at 10 Hz control.

"dynamic" here means moving obstacles (other AGVs or people walking back and forth on straight
paths), not a moving goal: the issue asks for moving AGVs or people, and a goal that moves while
the reward stays sparse would only measure luck. The goal stays fixed during an episode.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from robodistill.errors import UserError

ROBOT_RADIUS = 0.25
MOVER_RADIUS = 0.3
WALL = 0.5  # wall thickness outside the arena; walls are rectangles like the shelves, so one ray test serves both
FAR = -100.0  # unused shelf slots are parked here, where no ray or robot reaches them


@dataclass(frozen=True)
class Scene:
    name: str
    size: float  # square arena side, metres
    max_shelves: int
    movers: int
    max_steps: int
    min_goal_distance: float

    @property
    def slots(self) -> int:
        return 4 + self.max_shelves


SCENES = {
    "simple_static": Scene("simple_static", 8.0, 3, 0, 200, 3.0),
    "simple_dynamic": Scene("simple_dynamic", 8.0, 3, 2, 200, 3.0),
    "complex_static": Scene("complex_static", 12.0, 15, 0, 300, 5.0),
    "complex_dynamic": Scene("complex_dynamic", 12.0, 15, 4, 400, 5.0),
}


def get_scene(name: str) -> Scene:
    if name not in SCENES:
        raise UserError(f"unknown AGV scene '{name}' (env.scene). Valid: {', '.join(SCENES)}")
    return SCENES[name]


@dataclass
class Layout:
    rects: np.ndarray  # (K, 4) xmin, ymin, xmax, ymax: walls first, then shelves
    start: np.ndarray  # (2,)
    heading: float
    goal: np.ndarray  # (2,)
    mover_a: np.ndarray  # (M, 2) ends of each mover's back-and-forth path
    mover_b: np.ndarray  # (M, 2)
    mover_speed: np.ndarray  # (M,) m/s
    mover_phase: np.ndarray  # (M,) metres travelled along the there-and-back loop at t=0


def walls(size: float) -> np.ndarray:
    s, w = size, WALL
    return np.array([[-w, -w, 0, s + w], [s, -w, s + w, s + w], [-w, -w, s + w, 0], [-w, s, s + w, s + w]])


def _simple_shelves(rng: np.random.Generator, scene: Scene) -> list[list[float]]:
    shelves = []
    for _ in range(scene.max_shelves):
        long, short = rng.uniform(1.2, 2.8), rng.uniform(0.5, 0.9)
        w, h = (long, short) if rng.random() < 0.5 else (short, long)
        x, y = rng.uniform(1.0, scene.size - 1.0 - w), rng.uniform(1.0, scene.size - 1.0 - h)
        shelves.append([x, y, x + w, y + h])
    return shelves


def _warehouse_shelves(rng: np.random.Generator, scene: Scene) -> list[list[float]]:
    """3 columns x 5 rows of 2.4 x 0.8 m racks with 1.2 m aisles; a quarter of them missing, all jittered."""
    shelves = []
    for cx in (2.5, 6.0, 9.5):
        for cy in (2.0, 4.0, 6.0, 8.0, 10.0):
            if rng.random() < 0.25:
                continue
            x = cx + rng.uniform(-0.3, 0.3)
            shelves.append([x - 1.2, cy - 0.4, x + 1.2, cy + 0.4])
    return shelves


def _clearance(points: np.ndarray, rects: np.ndarray) -> np.ndarray:
    """Distance from each point (N, 2) to the nearest rectangle (K, 4)."""
    p = points[:, None, :]
    gap = np.maximum(np.maximum(rects[None, :, :2] - p, p - rects[None, :, 2:]), 0.0)
    return np.sqrt((gap * gap).sum(-1).min(axis=1))


def _free_point(rng: np.random.Generator, rects: np.ndarray, size: float, margin: float) -> np.ndarray:
    # Candidates in bulk: one numpy call instead of a Python loop per rejected point.
    while True:
        p = rng.uniform(margin, size - margin, size=(64, 2))
        ok = np.flatnonzero(_clearance(p, rects) > margin)
        if ok.size:
            return p[ok[0]]


def _connected(rects: np.ndarray, size: float, a: np.ndarray, b: np.ndarray) -> bool:
    """Whether a robot fits along some path from a to b: flood fill of a grid whose obstacles are
    grown by the robot radius (as boxes, slightly conservative at corners)."""
    cell = 0.1
    n = int(round(size / cell))
    free = np.ones((n, n), dtype=bool)
    for xmin, ymin, xmax, ymax in rects:
        lo = np.floor((np.array([xmin, ymin]) - ROBOT_RADIUS) / cell + 0.5).astype(int).clip(0, n)
        hi = np.ceil((np.array([xmax, ymax]) + ROBOT_RADIUS) / cell - 0.5).astype(int).clip(0, n)
        free[lo[0]:hi[0], lo[1]:hi[1]] = False
    labels, _ = ndimage.label(free)
    ia, ib = (np.clip((p / cell).astype(int), 0, n - 1) for p in (a, b))
    return labels[tuple(ia)] != 0 and labels[tuple(ia)] == labels[tuple(ib)]


def _mover_path(rng: np.random.Generator, rects: np.ndarray, size: float, start: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A straight path clear of shelves that passes no closer to the robot's start than a safe gap."""
    margin, n = MOVER_RADIUS + 0.05, 16
    while True:
        a = rng.uniform(margin, size - margin, size=(n, 2))
        angle, length = rng.uniform(0, 2 * np.pi, n), rng.uniform(2.0, 5.0, n)
        b = a + length[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=-1)
        away = _segment_distance(start, a, b) > ROBOT_RADIUS + MOVER_RADIUS + 0.3
        inside = np.flatnonzero(((b > margin) & (b < size - margin)).all(axis=1) & away)
        # 10 points along a path of at most 5 m are closer together than a shelf grown by the margin is thick.
        along = a[inside, None] + np.linspace(0, 1, 10)[None, :, None] * (b - a)[inside, None]
        clear = (_clearance(along.reshape(-1, 2), rects) > margin).reshape(-1, 10).all(axis=1)
        ok = inside[clear]
        if ok.size:
            return a[ok[0]], b[ok[0]]


def _segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance from point p (2,) to each segment a[i]-b[i] (M, 2)."""
    ab = b - a
    t = np.clip(((p - a) * ab).sum(-1) / (ab * ab).sum(-1), 0, 1)
    return np.linalg.norm(p - (a + t[:, None] * ab), axis=-1)


def generate(rng: np.random.Generator, scene: Scene) -> Layout:
    """A layout in which the goal is reachable and no mover's path touches the start."""
    shelf_fn = _warehouse_shelves if scene.name.startswith("complex") else _simple_shelves
    while True:
        shelves = shelf_fn(rng, scene)
        rects = np.concatenate([walls(scene.size), np.asarray(shelves, dtype=np.float64).reshape(-1, 4)])
        start = _free_point(rng, rects, scene.size, ROBOT_RADIUS + 0.3)
        movers = [_mover_path(rng, rects, scene.size, start) for _ in range(scene.movers)]
        mover_a = np.asarray([m[0] for m in movers]).reshape(-1, 2)
        mover_b = np.asarray([m[1] for m in movers]).reshape(-1, 2)
        for _ in range(50):
            goal = _free_point(rng, rects, scene.size, ROBOT_RADIUS + 0.2)
            if np.linalg.norm(goal - start) >= scene.min_goal_distance:
                break
        else:
            continue
        if not _connected(rects, scene.size, start, goal):
            continue
        padding = np.full((scene.slots - len(rects), 4), FAR)
        return Layout(
            rects=np.concatenate([rects, padding]),
            start=start,
            heading=float(rng.uniform(-np.pi, np.pi)),
            goal=goal,
            mover_a=mover_a,
            mover_b=mover_b,
            mover_speed=rng.uniform(0.4, 0.8, size=scene.movers),
            mover_phase=rng.uniform(0, 1, size=scene.movers) * 2 * np.linalg.norm(mover_b - mover_a, axis=-1),
        )
