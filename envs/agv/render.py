"""Top-down RGB frames of a batch, rasterised in numpy (videos need no renderer or GPU)."""

from __future__ import annotations

import numpy as np

from robodistill.envs.agv.batch import GOAL_RADIUS, AGVBatch
from robodistill.envs.agv.scenes import MOVER_RADIUS, ROBOT_RADIUS

FLOOR, SHELF, MOVER, GOAL, ROBOT, NOSE = (
    np.array(c, dtype=np.uint8)
    for c in ([235, 235, 230], [110, 90, 70], [230, 130, 40], [60, 180, 75], [40, 90, 200], [250, 250, 250])
)


def render(batch: AGVBatch, size: int) -> np.ndarray:
    """(B, size, size, 3) uint8; y points up as in the world frame."""
    scale = size / batch.scene.size
    centres = (np.arange(size) + 0.5) / scale
    x, y = np.meshgrid(centres, centres[::-1])  # (H, W) world coordinates of every pixel
    movers = batch.movers()
    heading = np.stack([np.cos(batch.theta), np.sin(batch.theta)], axis=-1)
    frames = np.empty((batch.num, size, size, 3), dtype=np.uint8)
    for i in range(batch.num):
        img = frames[i]
        img[:] = FLOOR
        r = batch.rects[i]
        shelf = ((x[..., None] >= r[:, 0]) & (x[..., None] <= r[:, 2]) & (y[..., None] >= r[:, 1]) & (y[..., None] <= r[:, 3])).any(-1)
        img[shelf] = SHELF
        img[np.hypot(x - batch.goal[i, 0], y - batch.goal[i, 1]) < GOAL_RADIUS] = GOAL
        for c in movers[i]:
            img[np.hypot(x - c[0], y - c[1]) < MOVER_RADIUS] = MOVER
        px, py = batch.pos[i]
        img[np.hypot(x - px, y - py) < ROBOT_RADIUS] = ROBOT
        nose = batch.pos[i] + 0.6 * ROBOT_RADIUS * heading[i]
        img[np.hypot(x - nose[0], y - nose[1]) < 0.35 * ROBOT_RADIUS] = NOSE
    return frames
