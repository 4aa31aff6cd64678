"""AdaRound (weight quantizer) and AWQDynamic (AWQ with per-group group-size choice).

Measured (seed 0, `_problem`): AdaRound / RTN calibration objective 0.66 (int4-sym-g32),
0.66 (row), 0.79 (int4-asym-g16), 0.65 (tile 8x8), 0.57 (int3 row). Held-out on the default
SyntheticLayer (g32, seeds 0-2): mean per-linear error / RTN 0.95-0.96 weight-only, 0.99-1.00
W4A4 (activation quantization dominates there; the objective is weight-only, as in the paper).
"""

import pytest
import torch

from mixq.config import QuantSpec
from mixq.methods import AdaRound, AWQDynamic, OutlierChannels
from mixq.methods.adaround import adaround_quantize, rectified_sigmoid
from mixq.methods.awq import awq_search, group_spec
from mixq.methods.awq_dynamic import choose_group_size
from mixq.methods.base import dequantize_qweight, quantize_weight
from synthetic import SimpleConfig, SyntheticLayer, make_context, make_inputs, run_methods

G32 = QuantSpec(4, True, "group", group_size=32)
A4 = QuantSpec(4, True, "row")
W4A4 = SimpleConfig(w=G32, a=A4)
# the weight formats and the Hessian-weighted problem GPTQ and Clip are tested on
from test_methods_quantizers import SPECS, _objective, _problem  # noqa: E402


# ------------------------------------------------------------------------------------ AdaRound
def test_rectified_sigmoid_range():
    v = torch.linspace(-20, 20, 101)
    h = rectified_sigmoid(v)
    assert float(h.min()) == 0.0 and float(h.max()) == 1.0 and bool((h.diff() >= 0).all())


@pytest.mark.parametrize("spec", SPECS)
def test_adaround_objective_below_rtn(seed, spec):
    w, h = _problem()
    ref = quantize_weight(w, spec)
    rtn = _objective(w, h, ref)
    qt, rest = adaround_quantize(w, h, w.shape[1], spec, n_steps=100)
    assert qt.q.shape == ref.q.shape and qt.q.dtype == ref.q.dtype and rest.shape == (37, 0)
    assert torch.equal(qt.scale, ref.scale)                        # RTN grid kept
    assert int(qt.q.min()) >= spec.qmin and int(qt.q.max()) <= spec.qmax
    assert _objective(w, h, qt) <= rtn * (1 + 1e-6)                # per-row RTN fallback
    assert _objective(w, h, qt) < 0.95 * rtn                       # and it really learns


def test_adaround_codes_are_floor_or_ceil(seed):
    w, h = _problem()
    qt, _ = adaround_quantize(w, h, 75, G32, n_steps=50)
    ref = quantize_weight(w, G32)
    assert int((qt.q.int() - ref.q.int()).abs().max()) <= 1       # only up/down flips
    assert torch.equal(qt.q[:, 75:], ref.q[:, 75:])                # zero padding untouched


def test_adaround_fp16_columns_absorb_error(seed):
    w, h = _problem()
    kq = 70                                                        # last 5 columns stay FP16
    qt, rest = adaround_quantize(w, h, kq, G32, n_steps=50)
    qt0, rest0 = adaround_quantize(w, h, kq, G32, n_steps=50, update_outliers=False)
    assert qt.q.shape[1] == 96 and rest.shape == (37, 5) and torch.equal(rest0, w[:, kq:])

    def total(q, r):
        d = torch.cat([w[:, :kq] - dequantize_qweight(q, 37, kq), w[:, kq:] - r], 1)
        return float(((d @ h) * d).sum())
    assert total(qt, rest) < total(qt0, rest0)


def test_adaround_method_lowers_layer_error(seed):
    s = seed % 100000
    rtn, err, fdiff = run_methods([AdaRound(n_steps=60)], seed=s, config=W4A4, dim=48, inter=64,
                                  n_heads=4, n_kv_heads=2)
    assert fdiff == 0 and err["mean"] < rtn["mean"]
    _, oc, _ = run_methods([OutlierChannels(k=4)], seed=s, config=W4A4, dim=48, inter=64,
                           n_heads=4, n_kv_heads=2)
    _, both, _ = run_methods([OutlierChannels(k=4), AdaRound(n_steps=60)], seed=s, config=W4A4,
                             dim=48, inter=64, n_heads=4, n_kv_heads=2)
    assert both["mean"] < oc["mean"]


def test_adaround_kinds_and_single_quantizer():
    layer = SyntheticLayer(dim=32, inter=48, n_heads=2, n_kv_heads=1, seed=0)
    ctx = make_context(layer, make_inputs(layer, 2, 32, seed=1), W4A4)
    AdaRound(n_steps=5, kinds=("down",)).apply(ctx)
    assert list(ctx.qweights) == ["mlp.down_proj"]
    with pytest.raises(ValueError, match="only one weight quantizer"):
        AdaRound(n_steps=5, kinds=("down",)).apply(ctx)


@pytest.mark.parametrize("kw", [dict(n_steps=0), dict(lr=0.0), dict(reg_weight=-1.0),
                                dict(beta=(2, 20)), dict(beta=(20,)), dict(beta=[20, 2]),
                                dict(kinds=("qq",)), dict(kinds=()), dict(warmup=1.0),
                                dict(n_steps=True), dict(update_outliers=1)])
def test_adaround_bad_config(kw):
    with pytest.raises(ValueError):
        AdaRound(**kw)


# ------------------------------------------------------------------------------------ AWQDynamic
FAST = dict(n_grid=4, max_rows=128)
CFG = SimpleConfig(w=QuantSpec(4, True, "group", group_size=128), a=A4)


def _layer(seed, plant):
    layer = SyntheticLayer(dim=64, inter=128, n_heads=4, n_kv_heads=2, seed=seed)
    if plant:   # one 25x weight per row: a per-group outlier pattern small groups isolate
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                        layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj,
                        layer.mlp.down_proj):
                n, k = lin.weight.shape
                lin.weight[torch.arange(n), torch.randint(0, k, (n,), generator=g)] *= 25
    return layer, make_inputs(layer, 2, 64, seed=seed + 1)


def test_awq_dynamic_picks_small_groups_for_planted_outliers(seed):
    layer, x = _layer(seed % 100000, plant=True)
    ctx = make_context(layer, x, CFG)
    m = AWQDynamic(candidates=(16, 32, 64, 128), tolerance=0.1, **FAST)
    for grp in ctx.groups:
        g, s, losses = choose_group_size(ctx, grp, m)
        assert set(losses) == {16, 32, 64, 128} and s.shape == (grp.linears[0].in_features,)
        assert g < 128 and losses[g] < losses[128]
    m.apply(ctx)
    assert all(ctx.w_specs[n].group_size < 128 for n in ctx.names())


def test_awq_dynamic_never_worse_than_awq_default(seed):
    """With 128 among the candidates, the chosen (g, s) has a search loss <= fixed-g128 AWQ's.

    (Compared per group at search time, before any folding: a later group's scale folds into an
    earlier group's producer, e.g. o_proj's into v_proj, so final errors are not comparable.)
    """
    layer, x = _layer(seed % 100000, plant=False)
    ctx = make_context(layer, x, CFG)
    m = AWQDynamic(candidates=(32, 64, 128), **FAST)
    for grp in ctx.groups:
        if grp.prev_norm is None and grp.prev_linear is None:
            continue
        g, _, losses = choose_group_size(ctx, grp, m)
        specs = [group_spec(ctx.weight_spec(n), 128) for n in grp.names]
        _, loss128, _ = awq_search(ctx, grp, specs=specs, **FAST)
        assert losses[128] == pytest.approx(loss128, rel=1e-6)
        assert losses[g] <= loss128 * (1 + 1e-6)
        assert losses[g] == min(losses.values())


def test_awq_dynamic_padding_rule():
    layer, x = _layer(0, plant=False)            # K = 64 (attn/mlp_in), 128 (down)
    ctx = make_context(layer, x, CFG)
    m = AWQDynamic(candidates=(48, 256), allow_padding=False, **FAST)
    g, _, losses = choose_group_size(ctx, ctx.groups[0], m)   # 48 does not divide 64
    assert g == 256 and set(losses) == {256}
    m2 = AWQDynamic(candidates=(48, 32), allow_padding=True, **FAST)
    _, _, losses = choose_group_size(ctx, ctx.groups[0], m2)
    assert set(losses) == {32, 48}


@pytest.mark.parametrize("kw", [dict(candidates=()), dict(candidates=(8,)), dict(candidates=(64, 64)),
                                dict(candidates=[64]), dict(tolerance=-0.1), dict(n_grid=1),
                                dict(kinds=("mlp",)), dict(allow_padding="yes")])
def test_awq_dynamic_bad_config(kw):
    with pytest.raises(ValueError):
        AWQDynamic(**kw)


def test_adaround_learns_under_no_grad(seed):      # mixq.quantize calls methods under no_grad
    w, h = _problem()
    with torch.no_grad():
        qt, _ = adaround_quantize(w, h, 75, G32, n_steps=50)
    assert _objective(w, h, qt) < 0.95 * _objective(w, h, quantize_weight(w, G32))
