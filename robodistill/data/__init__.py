"""Demonstration data: ManiSkill trajectory files, training windows, normalizers."""

from robodistill.data.normalizers import Normalizer
from robodistill.data.trajectories import Episode, TrajectoryFile, load_episodes, open_trajectory
from robodistill.data.windows import Horizons, WindowDataset, fit_normalizers, sample_batches, split_episodes

__all__ = [
    "Episode", "Horizons", "Normalizer", "TrajectoryFile", "WindowDataset",
    "fit_normalizers", "load_episodes", "open_trajectory", "sample_batches", "split_episodes",
]
