"""OutlierChannels and LayerwiseQuant: mixed-precision decisions and their error effect."""
import pytest
import torch

from mixq.config import QuantSpec
from mixq.methods import LayerwiseQuant, OutlierChannels
from synthetic import SimpleConfig, SyntheticLayer, make_context, make_inputs, run_methods

W4A4 = SimpleConfig(w=QuantSpec(4, True, "group", group_size=32), a=QuantSpec(4, True, "row"))


def test_calib_max_finds_planted_channels_and_lowers_error(seed):
    layer = SyntheticLayer(seed=seed % 100000)
    ctx = make_context(layer, make_inputs(layer, 2, 32, seed=seed % 1000), W4A4)
    OutlierChannels(k=3, group_size=64).apply(ctx)
    assert torch.equal(ctx.outliers("self_attn.q_proj"), layer.outlier_channels["residual"])
    assert torch.equal(ctx.outliers("mlp.down_proj"), layer.outlier_channels["mlp_out"])
    assert ctx.weight_spec("mlp.up_proj").group_size == 64
    rtn, err, _ = run_methods([OutlierChannels(fraction=0.1)], seed=seed % 100000, config=W4A4)
    assert err["mean"] < 0.4 * rtn["mean"] and err["layer"] < 0.5 * rtn["layer"]


@pytest.mark.parametrize("strategy", ["max", "mean3std", "argmax"])
def test_salient_weight_strategies(seed, strategy):
    layer = SyntheticLayer(dim=48, inter=40, seed=seed % 1000)
    ctx = make_context(layer, make_inputs(layer, 1, 16, seed=seed % 1000), W4A4)
    OutlierChannels(fraction=0.1, strategy=strategy).apply(ctx)
    for n in ctx.names():
        idx = ctx.outliers(n)
        assert idx.numel() == -(-ctx.linear(n).in_features // 10) and torch.equal(idx, idx.sort().values)


def test_layerwise_selects_kinds_and_layers(seed):
    rtn, err, _ = run_methods([LayerwiseQuant(kinds=("down", "o"))], seed=seed % 100000, config=W4A4)
    for n in ("mlp.down_proj", "self_attn.o_proj"):
        assert err[n] < 0.25 * rtn[n]
    assert err["self_attn.q_proj"] == rtn["self_attn.q_proj"]
    layer = SyntheticLayer(dim=48, inter=40)
    ctx = make_context(layer, make_inputs(layer, 1, 8, seed=0), W4A4, index=3)
    LayerwiseQuant(kinds=("q",), layers=(0, 1)).apply(ctx)
    assert ctx.w_specs == {} and ctx.a_bits == {}
    LayerwiseQuant(kinds=("q",), layers=(3,), bits=6, act_bits=None).apply(ctx)
    assert ctx.weight_spec("self_attn.q_proj").bits == 6 and ctx.act_bits("self_attn.q_proj") is None


@pytest.mark.parametrize("make, match", [
    (lambda: OutlierChannels(fraction=0.1, k=2), "exactly one"),
    (lambda: OutlierChannels(fraction=0.9), "fraction"),
    (lambda: OutlierChannels(strategy="min"), "strategy"),
    (lambda: OutlierChannels(group_size=32), "group_size"),
    (lambda: LayerwiseQuant(kinds=("ffn",)), "kinds"),
    (lambda: LayerwiseQuant(layers=(-1,)), "layers"),
    (lambda: LayerwiseQuant(bits=16), "bits"),
])
def test_bad_configs_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()
