"""quantlib.data: the benchmark protocol's split, calibration sampler and evaluation windows."""
from __future__ import annotations

import pytest
import torch

from quantlib.data import calibration_starts, eval_windows, sample_calibration, split_halves


def test_split_halves_exact_and_views():
    ids = torch.arange(11)
    pool, ev = split_halves(ids)
    assert pool.tolist() == list(range(5)) and ev.tolist() == list(range(5, 11))
    assert pool.data_ptr() == ids.data_ptr()  # views, no copy
    with pytest.raises(ValueError, match="at least 2 tokens"):
        split_halves(torch.arange(1))
    with pytest.raises(ValueError, match="1-D"):
        split_halves(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        split_halves(torch.zeros(4))


def test_calibration_starts_match_protocol_for_seed_0():
    # docs/protocol.md: g = torch.Generator().manual_seed(0); torch.randint(0, half - 512 + 1, (128,), generator=g)
    # with half = 301948 // 2 (SmolLM2 tokens of the mirror's wiki.test.raw).
    starts = calibration_starts(150974, n=128, seqlen=512, seed=0)
    assert starts.shape == (128,) and starts.dtype == torch.int64
    assert starts[:8].tolist() == [133149, 113353, 12788, 85923, 133048, 9509, 104388, 121311]
    assert int(starts.max()) <= 150974 - 512
    assert calibration_starts(100, 5, 10, seed=0).tolist() == [81, 80, 14, 16, 64]
    assert calibration_starts(100, 5, 10, seed=1).tolist() == [84, 87, 81, 66, 45]


def test_sample_calibration_rows_are_pool_slices_and_deterministic():
    pool = torch.arange(1000, 1100)  # (100,), value = 1000 + position
    x = sample_calibration(pool, n=5, seqlen=10, seed=0)
    assert x.shape == (5, 10) and x.dtype == torch.int64
    for row, s in zip(x, [81, 80, 14, 16, 64]):
        assert torch.equal(row, pool[s : s + 10])
    assert torch.equal(x, sample_calibration(pool, 5, 10, seed=0))
    assert not torch.equal(x, sample_calibration(pool, 5, 10, seed=1))
    x[0, 0] = -1
    assert pool[81] == 1081  # output is a copy, the pool is untouched


def test_sample_calibration_edges_and_errors():
    pool = torch.arange(10)
    whole = sample_calibration(pool, n=3, seqlen=10, seed=0)  # only one valid start: 0
    assert torch.equal(whole, pool.expand(3, 10))
    with pytest.raises(ValueError, match="at least seqlen=11 tokens, but it has 10"):
        sample_calibration(pool, n=1, seqlen=11, seed=0)
    for bad in ({"n": 0, "seqlen": 4}, {"n": 2, "seqlen": 0}, {"n": 2.0, "seqlen": 4}):
        with pytest.raises(ValueError, match="positive integer"):
            sample_calibration(pool, seed=0, **bad)


def test_eval_windows_non_overlapping_first_n():
    ids = torch.arange(25)
    w = eval_windows(ids, window=4, n_windows=3)
    assert w.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert eval_windows(ids, window=4, n_windows=None).shape == (6, 4)  # tail of 1 dropped
    assert torch.equal(eval_windows(ids, 25, None), ids[None])
    w[0, 0] = -1
    assert ids[0] == 0  # a copy, not a view


def test_eval_windows_with_stride():
    ids = torch.arange(10)
    w = eval_windows(ids, window=4, n_windows=None, stride=2)
    assert w.tolist() == [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7], [6, 7, 8, 9]]
    assert eval_windows(ids, 4, 2, stride=3).tolist() == [[0, 1, 2, 3], [3, 4, 5, 6]]


def test_eval_windows_too_short():
    ids = torch.arange(100)
    with pytest.raises(ValueError, match="need 120 tokens, but only 100 are present"):
        eval_windows(ids, window=40, n_windows=3)
    with pytest.raises(ValueError, match="at least window=101 tokens, got 100"):
        eval_windows(ids, window=101, n_windows=None)
    with pytest.raises(ValueError, match="positive integer"):
        eval_windows(ids, window=4, n_windows=0)


def test_protocol_shapes_on_a_synthetic_stream():
    # 301,948 ids as for SmolLM2 on wiki.test.raw: 128 x 512 calibration, 16 x 1024 evaluation.
    ids = torch.arange(301_948)
    pool, ev = split_halves(ids)
    calib = sample_calibration(pool, 128, 512, seed=0)
    windows = eval_windows(ev, 1024, 16)
    assert calib.shape == (128, 512) and int(calib.max()) < len(pool)
    assert windows.shape == (16, 1024) and int(windows[0, 0]) == 150_974
    assert int(windows[-1, -1]) == 150_974 + 16 * 1024 - 1
