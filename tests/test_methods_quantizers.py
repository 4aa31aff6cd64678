"""RTN, Clip and GPTQ weight quantizers: calibration objective and held-out error vs RTN.

20-seed margins on the synthetic layer: Clip W4A4 mean-error ratio <= 0.92; GPTQ weight-only
<= 0.79; OutlierChannels(k=9)+GPTQ vs OutlierChannels alone: 0.20 vs 0.23 of RTN.
"""
import pytest
import torch

from mixq.config import QuantSpec
from mixq.methods import GPTQ, RTN, Clip, OutlierChannels
from mixq.methods.base import dequantize_qweight, quantize_weight
from mixq.methods.clip import clip_search
from mixq.methods.gptq import gptq_quantize
from synthetic import SimpleConfig, run_methods

G32 = QuantSpec(4, True, "group", group_size=32)
W4A4 = SimpleConfig(w=G32, a=QuantSpec(4, True, "row"))
W4 = SimpleConfig(w=G32, a=None)
SPECS = [G32, QuantSpec(4, True, "row"), QuantSpec(4, False, "group", group_size=16),
         QuantSpec(4, True, "tile", tile=(8, 8)), QuantSpec(3, True, "row")]


def _problem(n=37, k=75, rows=300):
    x = torch.randn(rows, k // 3) @ torch.randn(k // 3, k) + 0.3 * torch.randn(rows, k)
    return torch.randn(n, k), 2.0 / rows * x.T @ x


def _objective(w, h, qt):
    d = w - dequantize_qweight(qt, *w.shape)
    return float(((d @ h) * d).sum())


@pytest.mark.parametrize("spec", SPECS)
def test_gptq_and_clip_objective_below_rtn(seed, spec):
    w, h = _problem()
    rtn = _objective(w, h, quantize_weight(w, spec))
    qt, _ = gptq_quantize(w, h, w.shape[1], spec)
    assert qt.q.shape == quantize_weight(w, spec).q.shape and qt.scale.shape == quantize_weight(w, spec).scale.shape
    assert int(qt.q.min()) >= spec.qmin and int(qt.q.max()) <= spec.qmax
    assert _objective(w, h, qt) < rtn
    assert _objective(w, h, clip_search(w, h, spec)) <= rtn * (1 + 1e-6)


def test_gptq_block_size_and_act_order(seed):
    w, h = _problem()
    a, _ = gptq_quantize(w, h, 75, G32, block_size=1)
    b, _ = gptq_quantize(w, h, 75, G32, block_size=128)
    assert torch.equal(a.q, b.q) and torch.equal(a.scale, b.scale)   # lazy batching is exact
    c, _ = gptq_quantize(w, h, 75, G32, act_order=True)
    assert _objective(w, h, c) < _objective(w, h, quantize_weight(w, G32))


def test_gptq_updates_fp16_columns(seed):
    w, h = _problem()
    qt, rest = gptq_quantize(w, h, 70, G32)            # last 5 columns kept in FP16
    assert qt.q.shape[1] == 96 and rest.shape == (37, 5)
    assert not torch.allclose(rest, w[:, 70:])          # they absorbed error compensation


def test_rtn_method_equals_default_path(seed):
    rtn, err, _ = run_methods([RTN()], seed=seed % 100000, config=W4A4)
    assert err == rtn


def test_clip_lowers_w4a4_error(seed):
    rtn, err, fdiff = run_methods([Clip(n_grid=10)], seed=seed % 100000, config=W4A4)
    assert fdiff == 0 and err["mean"] < 0.97 * rtn["mean"]


def test_gptq_lowers_error(seed):
    rtn, err, _ = run_methods([GPTQ()], seed=seed % 100000, config=W4)
    assert err["mean"] < 0.9 * rtn["mean"]
    _, oc, _ = run_methods([OutlierChannels(k=9)], seed=seed % 100000, config=W4A4)
    rtn4, both, _ = run_methods([OutlierChannels(k=9), GPTQ()], seed=seed % 100000, config=W4A4)
    assert both["mean"] <= oc["mean"] < 0.4 * rtn4["mean"]


def test_two_weight_quantizers_raise():
    with pytest.raises(ValueError, match="only one weight quantizer"):
        run_methods([Clip(n_grid=2), GPTQ()], seed=0, config=W4A4, dim=48, inter=40)


@pytest.mark.parametrize("make, match", [
    (lambda: GPTQ(damp=1.0), "damp"), (lambda: GPTQ(block_size=0), "block_size"),
    (lambda: GPTQ(act_order=1), "act_order"), (lambda: Clip(n_grid=1), "n_grid"),
    (lambda: Clip(max_shrink=1.0), "max_shrink"), (lambda: RTN(kinds=("mlp",)), "kinds"),
])
def test_bad_configs_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_sink_weight_counts_the_first_token_w_times(seed):
    """hessian_of(stats, w) = H + (w - 1) H_sink, i.e. the Hessian of a token stream in which
    every sequence's first row appears w times; "seqlen" is w = T."""
    from mixq.calibrate import StatsAccumulator
    from mixq.methods.base import hessian_of
    k, b, t = 6, 4, 9
    x = torch.randn(b, t, k)
    acc = StatsAccumulator(k, max_rows=0, hessian=True)
    acc.update(x)
    st = acc.finalize()
    torch.testing.assert_close(hessian_of(st), st.hessian)
    rows = x.reshape(-1, k).double()
    first = x[:, 0].double()
    for w, w_num in ((3.0, 3.0), ("seqlen", float(t))):
        want = 2.0 / (b * t) * (rows.T @ rows + (w_num - 1) * first.T @ first)
        torch.testing.assert_close(hessian_of(st, w), want.float(), rtol=1e-5, atol=1e-5)
    for bad in (0, -1.0, "first", float("nan")):
        with pytest.raises(ValueError, match="sink_weight"):
            GPTQ(sink_weight=bad)


def test_gptq_sink_weight_round_trips_in_the_config():
    from mixq.config import QuantConfig
    cfg = QuantConfig(mode="w4a16", w=G32, methods=(GPTQ(sink_weight="seqlen"),))
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg


def test_rotation_and_smoothing_transform_the_sink_hessian(seed):
    """rotate_stats (x -> x Q) and the SmoothQuant fold (x -> x / s) give the sink Hessian of the
    transformed first-token rows, as for the full Hessian."""
    from types import SimpleNamespace

    from mixq.calibrate import StatsAccumulator
    from mixq.methods.base import _scale_stats
    from mixq.methods.rotation import hadamard, rotate_stats
    k = 8
    x = torch.randn(3, 5, k)
    q = hadamard(k, random_signs=True, seed=seed % 1000)
    s = torch.rand(k) + 0.5

    def stats(t):
        acc = StatsAccumulator(k, max_rows=100, hessian=True)
        acc.update(t)
        return acc.finalize()
    group = SimpleNamespace(names=("a",))
    st = stats(x)
    rotate_stats(SimpleNamespace(stats={"a": st}), group, q)
    want = stats((x.double() @ q.double()).float())
    torch.testing.assert_close(st.sink_hessian, want.sink_hessian, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(st.hessian, want.hessian, rtol=1e-4, atol=1e-5)
    st = stats(x)
    _scale_stats(SimpleNamespace(stats={"a": st}), group, s)
    want = stats(x / s)
    torch.testing.assert_close(st.sink_hessian, want.sink_hessian, rtol=1e-4, atol=1e-5)
