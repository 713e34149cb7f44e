"""Windows, normalizers and splits on episodes built in the test (exact expected values)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from robodistill.data import Episode, Horizons, Normalizer, WindowDataset, fit_normalizers, split_episodes
from robodistill.envs import zero_action_holds_still


def episode(T: int, offset: float = 0.0) -> Episode:
    steps = np.arange(T + 1, dtype=np.float32)[:, None]
    state = np.concatenate([steps + offset, np.full_like(steps, 5.0)], axis=1)  # dim 1 is constant
    actions = np.concatenate([np.arange(1, T + 1, dtype=np.float32)[:, None].repeat(3, 1), np.full((T, 1), -1.0, np.float32)], 1)
    return Episode(Path("synthetic.h5"), 0, 0, True, actions, {"state": state})


def test_window_count_and_edge_padding_delta_and_absolute():
    ep = episode(10)
    h = Horizons(obs=2, pred=4, act=2)
    ds = WindowDataset([ep], h, delta_actions=True)
    # starts from -(obs-1) = -1 to T - pred + act - 1 = 7
    assert len(ds) == 9
    first = ds[0]
    assert first["obs"]["state"][:, 0].tolist() == [0.0, 0.0]  # o_0 repeated before the start
    assert first["actions"][:, 0].tolist() == [1.0, 1.0, 2.0, 3.0]  # a_0 repeated before the start
    last = ds[len(ds) - 1]
    assert last["obs"]["state"][:, 0].tolist() == [7.0, 8.0]
    # a_7, a_8, a_9 then one step past the end: hold still (zero arm), keep the gripper command
    assert last["actions"].tolist() == [[8, 8, 8, -1], [9, 9, 9, -1], [10, 10, 10, -1], [0, 0, 0, -1]]
    absolute = WindowDataset([ep], h, delta_actions=False)[len(ds) - 1]
    assert absolute["actions"][-1].tolist() == [10, 10, 10, -1]  # absolute targets repeat
    # which modes pad with "hold still": those where a zero arm action is no motion
    assert [zero_action_holds_still(m) for m in ("pd_ee_delta_pos", "pd_joint_vel", "pd_joint_pos", "pd_ee_pose", None)] == \
        [True, True, False, False, False]


def test_delta_padding_holds_still_without_a_gripper_or_with_it_elsewhere():
    # the last dim was kept as "the gripper": on a robot without one (PushT's panda_stick) that kept an arm motion going
    T, h = 6, Horizons(obs=1, pred=4, act=3)  # the last window: a_4, a_5, then two steps past the end
    rng = np.random.default_rng(0)
    arm = rng.uniform(-0.5, 0.5, (T, 3)).astype(np.float32)
    gripper = np.array([-1, -1, 1, 1, 1, -1], np.float32)[:, None]
    for actions, hold in ((arm, [0, 0, 0]), (np.concatenate([arm[:, :1], gripper, arm[:, 1:]], 1), [0, -1, 0, 0])):
        ep = Episode(Path("synthetic.h5"), 0, 0, True, actions, {"state": np.zeros((T + 1, 2), np.float32)})
        last = WindowDataset([ep], h, delta_actions=True)[-1]["actions"]
        np.testing.assert_array_equal(last[:2].numpy(), actions[-2:])
        assert last[2:].tolist() == [hold] * 2


def test_short_episode_still_gives_a_padded_window():
    ds = WindowDataset([episode(2)], Horizons(obs=2, pred=16, act=8), delta_actions=True)
    assert len(ds) >= 1
    sample = ds[0]
    assert sample["actions"].shape == (16, 4) and sample["obs"]["state"].shape == (2, 2)


def test_horizons_are_checked():
    with pytest.raises(ValueError, match="act <= pred - obs \\+ 1"):
        Horizons(obs=2, pred=4, act=4)


def test_minmax_and_meanstd_normalizers():
    eps = [episode(10), episode(6, offset=100.0)]
    norms = fit_normalizers(eps, "minmax")
    states = torch.from_numpy(np.concatenate([e.obs["state"][: len(e)] for e in eps]))
    y = norms["state"](states)
    assert y[:, 0].min().item() == pytest.approx(-1.0) and y[:, 0].max().item() == pytest.approx(1.0)
    assert torch.all(y[:, 1] == 0)  # constant feature: centred, not divided by ~0
    torch.testing.assert_close(norms["state"].unnormalize(y), states)
    ms = Normalizer.fit(states.numpy(), "meanstd")
    z = ms(states)
    assert z[:, 0].mean().abs().item() < 1e-5 and z[:, 0].std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)
    saved = norms["actions"].state_dict()
    restored = Normalizer(4, "minmax")
    restored.load_state_dict(saved)  # the normalizer travels inside a model's state dict
    torch.testing.assert_close(restored.center, norms["actions"].center)


def test_windows_come_out_normalized():
    ep = episode(10)
    norms = fit_normalizers([ep])
    sample = WindowDataset([ep], Horizons(obs=2, pred=4, act=2), delta_actions=True, normalizers=norms)[3]
    assert sample["actions"].abs().max() <= 1.0 + 1e-6 and sample["obs"]["state"].abs().max() <= 1.0 + 1e-6


def test_split_is_by_episode_disjoint_and_repeatable():
    train, val = split_episodes(20, 0.2, seed=3)
    assert len(val) == 4 and not set(train) & set(val) and sorted(train + val) == list(range(20))
    assert (train, val) == split_episodes(20, 0.2, seed=3)
    assert split_episodes(1, 0.2) == ([0], [])
    assert len(split_episodes(3, 0.1)[1]) == 1  # a validation episode whenever one is asked for


def test_a_plot_the_disk_has_no_room_for_says_so_and_keeps_the_one_there(pushcube_demos, tmp_path):
    # savefig wrote in place: a cut-short PNG replaced the previous one, said as 'cannot write ... (File too large: None)'
    from robodistill.data.info import describe, plot_action_ranges
    from robodistill.errors import CutShort
    from tests.conftest import disk_full_past

    out = tmp_path / "actions.png"
    plot_action_ranges(describe(pushcube_demos)[1], "before", out)
    before = out.read_bytes()
    with disk_full_past(len(before) // 2), pytest.raises(CutShort, match=r"could not write .*actions.png: File too large \(actions.png as it was is kept\)"):
        plot_action_ranges(describe(pushcube_demos)[1], "after", out)
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["actions.png"]
