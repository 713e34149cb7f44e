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
    """(B, size, size, 3) uint8; y points up as in the world frame. Each shape is drawn inside its bounding
    box only: a whole-image mask per shelf made 256 px videos cost ~55 ms a frame."""
    centres = (np.arange(size) + 0.5) * batch.scene.size / size  # world coordinate of each pixel column (and row, from the bottom)

    def box(x0: float, y0: float, x1: float, y1: float) -> tuple[slice, slice]:
        """The rows and columns of the pixels whose centres lie in [x0, x1] x [y0, y1] (row 0 is the top)."""
        bottom, top = np.searchsorted(centres, y0, "left"), np.searchsorted(centres, y1, "right")
        return slice(size - top, size - bottom), slice(np.searchsorted(centres, x0, "left"), np.searchsorted(centres, x1, "right"))

    def disc(img: np.ndarray, cx: float, cy: float, r: float, colour: np.ndarray) -> None:
        rows, cols = box(cx - r, cy - r, cx + r, cy + r)
        inside = np.hypot(centres[cols][None, :] - cx, centres[::-1][rows][:, None] - cy) < r
        img[rows, cols][inside] = colour

    movers = batch.movers()
    heading = np.stack([np.cos(batch.theta), np.sin(batch.theta)], axis=-1)
    frames = np.empty((batch.num, size, size, 3), dtype=np.uint8)
    for i in range(batch.num):
        img = frames[i]
        img[:] = FLOOR
        for rect in batch.rects[i]:
            img[box(*rect)] = SHELF
        disc(img, *batch.goal[i], GOAL_RADIUS, GOAL)
        for c in movers[i]:
            disc(img, *c, MOVER_RADIUS, MOVER)
        disc(img, *batch.pos[i], ROBOT_RADIUS, ROBOT)
        disc(img, *(batch.pos[i] + 0.6 * ROBOT_RADIUS * heading[i]), 0.35 * ROBOT_RADIUS, NOSE)
    return frames
