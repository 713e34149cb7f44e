"""Training windows over episodes: obs history, action chunk, padding at the edges, episode split.

A window starting at step s holds observations o[s : s + obs_horizon] and actions
a[s : s + pred_horizon]; the policy will execute a[s + obs_horizon - 1 : ... + act_horizon]. As in
diffusion_policy, starts run from -(obs_horizon - 1) to T - pred_horizon + act_horizon - 1, and
steps outside the episode are padded: observations and leading actions repeat the first (or last)
value; trailing actions repeat the last action, or under delta and velocity control hold still (zero arm
motion, the last gripper command: dims that are only ever -1 or 1), since repeating one would keep the arm moving.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from robodistill.data.normalizers import Normalizer
from robodistill.data.trajectories import Episode


@dataclass(frozen=True)
class Horizons:
    obs: int = 2
    pred: int = 16
    act: int = 8

    def __post_init__(self) -> None:
        if not (1 <= self.obs and 1 <= self.act <= self.pred - self.obs + 1):
            raise ValueError(f"horizons need 1 <= obs, 1 <= act <= pred - obs + 1; got obs={self.obs} pred={self.pred} act={self.act}")


def split_episodes(n: int, val_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Episode indices for training and validation (whole episodes, so no window leaks across)."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction)) if n > 1 else 0
    n_val = min(max(n_val, 1 if val_fraction > 0 and n > 1 else 0), n - 1)
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())


def take_padded(values, start: int, stop: int, pad_after=None) -> np.ndarray:
    """values[start:stop] with indices outside [0, len) filled by the edge (or `pad_after`)."""
    n = len(values)
    inside = np.asarray(values[max(start, 0) : min(stop, n)])
    before = np.repeat(inside[:1], max(0, -start), axis=0)
    tail = inside[-1:] if pad_after is None else pad_after[None]
    after = np.repeat(tail, max(0, stop - n), axis=0)
    return np.concatenate([before, inside, after], axis=0)


def hold_still(actions: np.ndarray) -> np.ndarray:
    """After `actions` (T, A) under delta or velocity control, the action that holds still: zero motion, and the
    binary dims (a gripper's open/close commands, as the teacher finds them) at their last value. Not "the last dim
    kept", which on a robot without a gripper (PushT's panda_stick) kept an arm motion going."""
    binary = np.isin(actions, (-1.0, 1.0)).all(axis=0)
    return np.where(binary, actions[-1], 0).astype(actions.dtype)


class WindowDataset(Dataset):
    """Windows over episodes as tensors: `{"obs": {key: (obs_h, ...)}, "actions": (pred_h, A)}`.

    With normalizers, `state` and `actions` come out normalized; `rgb` stays uint8.
    """

    def __init__(
        self,
        episodes: list[Episode],
        horizons: Horizons,
        delta_actions: bool,
        normalizers: dict[str, Normalizer] | None = None,
    ):
        self.episodes = episodes
        self.h = horizons
        self.delta_actions = delta_actions
        self.normalizers = normalizers or {}
        self.index = [
            (e, s)
            for e, ep in enumerate(episodes)
            for s in range(-(horizons.obs - 1), max(-(horizons.obs - 1), len(ep) - horizons.pred + horizons.act - 1) + 1)
        ]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        e, s = self.index[i]
        ep = self.episodes[e]
        # Starts end early enough that a window never needs the final observation o_T.
        obs = {k: take_padded(v, s, s + self.h.obs) for k, v in ep.obs.items()}
        pad = hold_still(ep.actions) if self.delta_actions else None
        actions = take_padded(ep.actions, s, s + self.h.pred, pad_after=pad)
        out_obs = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in obs.items()}
        out = {"obs": out_obs, "actions": torch.from_numpy(actions)}
        with torch.no_grad():
            if "state" in self.normalizers:
                out_obs["state"] = self.normalizers["state"](out_obs["state"])
            if "actions" in self.normalizers:
                out["actions"] = self.normalizers["actions"](out["actions"])
        return out


def fit_normalizers(episodes: list[Episode], mode: str = "minmax") -> dict[str, Normalizer]:
    """Normalizers for `state` and `actions`, fitted on these (training) episodes only."""
    return {
        "state": Normalizer.fit(np.concatenate([ep.obs["state"][: len(ep)] for ep in episodes]), mode),
        "actions": Normalizer.fit(np.concatenate([ep.actions for ep in episodes]), mode),
    }


def sample_batches(ds: WindowDataset, batch_size: int, gen: torch.Generator, part: tuple[int, int] = (0, 1)):
    """Endless batches of windows drawn uniformly with replacement: the generator's state alone
    decides what comes next, so a resumed run draws exactly the batches the original would have.
    `part=(rank, world)`: every rank draws the same global batch and keeps its slice of it, so the
    ranks together see what one process would. State windows are small and are collated once; RGB
    windows are read per batch."""
    data = torch.utils.data.default_collate([ds[i] for i in range(len(ds))]) if "rgb" not in ds.episodes[0].obs else None
    rank, world = part
    while True:
        idx = torch.randint(len(ds), (batch_size,), generator=gen).chunk(world)[rank]
        if data is None:
            yield torch.utils.data.default_collate([ds[i] for i in idx.tolist()])
        else:
            yield {"obs": {k: v[idx] for k, v in data["obs"].items()}, "actions": data["actions"][idx]}
