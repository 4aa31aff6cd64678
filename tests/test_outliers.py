"""Tests for mixq.outliers: outlier / salient channel selection and the channel permutation."""
import pytest
import torch
from torch import nn

from mixq.config import QuantSpec
from mixq.outliers import (channel_max, dynamic_outliers, outlier_permutation,
                           outliers_by_threshold, outliers_topk, permute_linear_pair, resolve_k,
                           salient_weight_channels, split_outliers, weight_channel_stat)
from mixq.quant import quantize
from mixq.reference import w4a4_linear


def _planted(m, k, n_out, scale=30.0):
    """Activations with |x| < 3 except `n_out` random channels that reach +-`scale` on one token."""
    x = torch.randn(m, k).clamp(-2.9, 2.9)
    idx = torch.randperm(k)[:n_out].sort().values
    rows = torch.randint(0, m, (n_out,))
    x[rows, idx] = scale * (torch.randint(0, 2, (n_out,)) * 2 - 1).float()
    return x, idx


@pytest.mark.parametrize("m,k,n_out", [(1, 5, 1), (17, 67, 3), (40, 300, 7)])
def test_threshold_finds_planted_channels(m, k, n_out, seed):
    x, idx = _planted(m, k, n_out, scale=6.0)                # exactly the threshold counts
    found = outliers_by_threshold(x, 6.0)
    assert found.dtype == torch.int64 and torch.equal(found, idx)
    assert torch.equal(outliers_by_threshold(x.reshape(1, m, k).half()), idx)   # (B, T, K)
    assert outliers_by_threshold(x, 6.5).numel() == 0


@pytest.mark.parametrize("k,n_out", [(10, 1), (77, 5), (256, 12)])
def test_topk_and_dynamic_find_planted_channels(k, n_out, seed):
    x, idx = _planted(23, k, n_out)
    assert torch.equal(dynamic_outliers(x, k=n_out), idx)
    assert torch.equal(outliers_topk(channel_max(x), k=n_out), idx)
    assert torch.equal(outliers_topk(x.abs().amax(0), fraction=n_out / k), idx)
    # static: statistics from a calibration batch select channels for a later batch
    calib = channel_max(torch.cat([x, torch.randn(5, k)]))
    assert torch.equal(outliers_topk(calib, k=n_out), idx)


def test_topk_ties_fraction_and_errors():
    stat = torch.tensor([1.0, 5.0, 5.0, 0.0, 5.0])
    assert outliers_topk(stat, k=2).tolist() == [1, 2]       # ties -> lower index
    assert outliers_topk(stat, k=0).numel() == 0
    assert resolve_k(10, fraction=0.3) == 3 and resolve_k(10, fraction=0.25) == 3
    assert resolve_k(4096, fraction=0.01) == 41 and resolve_k(7, fraction=1.0) == 7
    with pytest.raises(ValueError, match="exactly one of k and fraction"):
        outliers_topk(stat, k=1, fraction=0.5)
    with pytest.raises(ValueError, match="exactly one of k and fraction"):
        outliers_topk(stat)
    with pytest.raises(ValueError, match=r"k must be an int in \[0, 5\]"):
        outliers_topk(stat, k=6)
    with pytest.raises(ValueError, match=r"fraction must be a number in \[0, 1\]"):
        outliers_topk(stat, fraction=1.5)
    with pytest.raises(ValueError, match="channel_stat must have 1 dims"):
        outliers_topk(stat[None], k=1)
    with pytest.raises(ValueError, match="non-finite"):
        outliers_topk(torch.tensor([1.0, float("nan")]), k=1)
    with pytest.raises(TypeError, match="dtype"):
        dynamic_outliers(torch.ones(3, 4, dtype=torch.int64), k=1)
    with pytest.raises(ValueError, match="threshold"):
        outliers_by_threshold(torch.ones(3, 4), threshold=0.0)


def _strategy_case(n, k, seed):
    """W (N, K) with background |W| <= 0.1 and three planted channels, one per strategy.

    a: a single spike 10 in row 0                 -> largest max |W|           ("max")
    b: 3.5 on the last ~half of the rows          -> largest mean + 3 std      ("mean3std")
    c: 1.0 on rows 1 .. n/2+1 (one more than b)    -> most rows' argmax         ("argmax")
    """
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(n, k, generator=g) * 0.2 - 0.1)
    a, b, c = torch.randperm(k, generator=g)[:3].tolist()
    rows_c = torch.arange(1, n // 2 + 2)
    rows_b = torch.arange(n // 2 + 2, n)
    w[:, a], w[0, a] = 0.05, 10.0
    w[:, b], w[rows_b, b] = 0.05, 3.5
    w[:, c], w[rows_c, c] = 0.0, 1.0
    return w, a, b, c


def test_salient_strategies_on_planted_case(seed):
    n, k = 64, 50
    w, a, b, c = _strategy_case(n, k, seed)
    # mean3std: b ~ 1.7 + 3 * 1.7 = 6.8 beats a ~ 0.2 + 3 * 1.24 = 3.9 and c ~ 0.5 + 3 * 0.5 = 2.0
    assert salient_weight_channels(w, 1 / k, "max").tolist() == [a]
    assert salient_weight_channels(w, 1 / k, "mean3std").tolist() == [b]
    assert salient_weight_channels(w, 1 / k, "argmax").tolist() == [c]
    assert salient_weight_channels(w, 3 / k, "max").tolist() == sorted([a, b, c])
    a_abs = w.abs()
    torch.testing.assert_close(weight_channel_stat(w, "mean3std"),
                               a_abs.mean(0) + 3 * a_abs.var(0, unbiased=False).sqrt())


def test_argmax_counts_and_tie_break():
    # Rows' argmax: row0 -> ch2, row1 -> ch0, row2 -> ch2, row3 -> ch0, row4 -> ch3.
    w = torch.tensor([[0.1, 0.0, 0.9, 0.0],
                      [0.8, 0.0, 0.1, 0.0],
                      [0.1, 0.2, -0.5, 0.0],
                      [-0.7, 0.0, 0.1, 0.0],
                      [0.0, 0.1, 0.0, 0.3]])
    assert weight_channel_stat(w, "argmax").tolist() == [2.0, 0.0, 2.0, 1.0]
    # ch0 and ch2 tie on count 2; ch2 has the larger max (0.9 > 0.8) -> wins
    k1 = salient_weight_channels(w, 0.25, "argmax")
    assert k1.tolist() == [2]
    assert salient_weight_channels(w, 0.5, "argmax").tolist() == [0, 2]
    assert salient_weight_channels(w, 0.75, "argmax").tolist() == [0, 2, 3]
    w2 = w.clone()
    w2[1, 0] = 0.95                                          # now ch0 has the larger max
    assert salient_weight_channels(w2, 0.25, "argmax").tolist() == [0]
    with pytest.raises(ValueError, match="strategy must be one of"):
        salient_weight_channels(w, 0.5, "median")
    with pytest.raises(ValueError, match="w must have 2 dims"):
        salient_weight_channels(w[0], 0.5)


def test_outlier_permutation_and_split(seed):
    perm = outlier_permutation(6, torch.tensor([4, 1]))
    assert perm.tolist() == [0, 2, 3, 5, 4, 1]
    k = 37
    x, idx = _planted(9, k, 5)
    perm = outlier_permutation(k, idx)
    assert torch.equal(perm.sort().values, torch.arange(k))
    reg, out = split_outliers(x[:, perm], idx.numel())
    assert reg.shape == (9, k - 5) and out.shape == (9, 5)
    assert torch.equal(out, x[:, idx])
    mask = torch.ones(k, dtype=torch.bool)
    mask[idx] = False
    assert torch.equal(reg, x[:, mask])                      # regular channels keep their order
    assert outlier_permutation(4, torch.tensor([], dtype=torch.int64)).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="duplicate"):
        outlier_permutation(6, torch.tensor([1, 1]))
    with pytest.raises(ValueError, match=r"outlier_idx must be in \[0, 6\)"):
        outlier_permutation(6, torch.tensor([6]))
    with pytest.raises(TypeError, match="outlier_idx must have dtype"):
        outlier_permutation(6, torch.tensor([1.0]))
    with pytest.raises(ValueError, match=r"n_outliers must be an int in \[0, 37\]"):
        split_outliers(x, 38)


@pytest.mark.parametrize("bias", [True, False])
def test_permute_linear_pair_keeps_function(bias, seed):
    d_in, hidden, d_out = 11, 29, 7
    prev, nxt = nn.Linear(d_in, hidden, bias=bias), nn.Linear(hidden, d_out, bias=bias)
    x = torch.randn(13, d_in)
    with torch.no_grad():
        h = torch.relu(prev(x))
        y = nxt(h)
        idx = dynamic_outliers(h, k=4)
        perm = outlier_permutation(hidden, idx)
        assert permute_linear_pair(prev, nxt, perm) == (prev, nxt)
        h2 = torch.relu(prev(x))
        torch.testing.assert_close(h2, h[:, perm], rtol=0, atol=0)
        torch.testing.assert_close(split_outliers(h2, 4)[1], h[:, idx], rtol=0, atol=0)
        torch.testing.assert_close(nxt(h2), y)


def test_permute_linear_pair_bad_inputs():
    a, b = nn.Linear(3, 4), nn.Linear(4, 2)
    with pytest.raises(ValueError, match="must equal next.in_features"):
        permute_linear_pair(a, nn.Linear(5, 2), torch.arange(4))
    with pytest.raises(ValueError, match="permutation of range"):
        permute_linear_pair(a, b, torch.tensor([0, 1, 1, 3]))
    with pytest.raises(TypeError, match="nn.Linear"):
        permute_linear_pair(a, nn.Conv1d(4, 2, 1), torch.arange(4))


def test_fp16_outlier_path_rescues_w4a4(seed):
    """Planted activation outliers ruin per-token int4; splitting them off to fp16 fixes it."""
    m, k, n, n_out = 32, 128, 24, 4
    x, idx = _planted(m, k, n_out, scale=60.0)
    x[:, idx] = 60.0 * torch.sign(torch.randn(m, n_out))   # outliers on every token
    w = torch.randn(n, k) * 0.05
    y_true = x @ w.T

    def run(x_, w_, n_split):
        xr, xo = split_outliers(x_, n_split)
        wr, wo = split_outliers(w_, n_split)
        qt = quantize(wr, QuantSpec(4, True, "row"))
        extra = dict(x_out=xo.half(), w_out=wo.half()) if n_split else {}
        return w4a4_linear(xr, qt.q, qt.scale, **extra)

    perm = outlier_permutation(k, dynamic_outliers(x, k=n_out))
    err_mixed = (run(x[:, perm], w[:, perm], n_out) - y_true).norm() / y_true.norm()
    err_plain = (run(x, w, 0) - y_true).norm() / y_true.norm()
    assert err_mixed < 0.25 * err_plain
