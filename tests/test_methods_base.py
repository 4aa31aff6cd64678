"""mixq.methods.base: qweights convention vs mixq.nn, quantized_output vs reference, scale folding."""
import copy

import pytest
import torch
from torch import nn

from mixq.config import QuantSpec
from mixq.methods.base import (LayerContext, check_number, dequantize_qweight, fold_scale, linear_kind,
                               output_error, quantize_weight, quantized_output, regular_weight, tie_scale)
from synthetic import SimpleConfig, SyntheticLayer, capture_outputs, make_context, make_inputs
from mixq.nn import W4A4Linear

W4A4 = SimpleConfig(w=QuantSpec(4, True, "group", group_size=32), a=QuantSpec(4, True, "row"))


@pytest.mark.parametrize("spec", [QuantSpec(4, True, "group", group_size=32), QuantSpec(4, True, "row"),
                                  QuantSpec(4, True, "tile", tile=(8, 8))])
def test_quantized_output_matches_w4a4linear(seed, spec):
    n, k = 37, 75                                            # awkward: padding along K and N
    lin = nn.Linear(k, n)
    x = torch.randn(19, k) * (1 + 20 * (torch.rand(k) < 0.05))
    idx = torch.sort(torch.randperm(k)[:3]).values
    mod = W4A4Linear.from_linear(lin, weight_spec=spec, outlier_idx=idx)
    y = quantized_output(lin, x, w_spec=spec, act_bits=4, outlier_idx=idx)
    torch.testing.assert_close(y, mod(x), rtol=1e-5, atol=1e-4)
    w_reg, _, _ = regular_weight(lin, idx)
    qt = quantize_weight(w_reg, spec)
    assert torch.equal(qt.q[:n], mod.w_q)                    # integer codes match exactly
    assert torch.equal(qt.scale, mod.w_scale)
    torch.testing.assert_close(dequantize_qweight(qt, n, k - 3), mod.dequantized_weight()[:, :k - 3])


def test_fold_scale_keeps_function_with_gqa(seed):
    layer = SyntheticLayer(dim=48, inter=40, n_heads=6, n_kv_heads=2, seed=seed % 1000)
    x = make_inputs(layer, 2, 16, seed=seed)
    ref = capture_outputs(layer, x)["_layer"]
    ctx = make_context(copy.deepcopy(layer), x, W4A4)
    for g in ctx.groups:
        s = torch.rand(g.linears[0].in_features) * 3 + 0.2
        fold_scale(ctx, g, tie_scale(ctx, g, s))
    torch.testing.assert_close(capture_outputs(ctx.layer, x)["_layer"], ref, rtol=1e-4, atol=1e-4)
    # stats follow the transform: calibration error equals the error on recaptured inputs
    from synthetic import capture_inputs
    n = "self_attn.o_proj"
    torch.testing.assert_close(ctx.stats[n].inputs, capture_inputs(ctx.layer, ctx.groups, x)[n],
                               rtol=1e-4, atol=1e-4)


def test_fold_scale_rejects_bad_input(seed):
    layer = SyntheticLayer(dim=48, inter=40, seed=seed % 1000)
    ctx = make_context(layer, make_inputs(layer, 1, 8, seed=seed), W4A4)
    g = ctx.groups[0]
    with pytest.raises(ValueError, match="s must be"):
        fold_scale(ctx, g, -torch.ones(48))
    with pytest.raises(ValueError, match="tie_scale"):
        fold_scale(ctx, ctx.groups[1], torch.rand(48) + 0.5)     # GQA o_proj: untied scale
    ctx.qweights["self_attn.q_proj"] = quantize_weight(g.linears[0].weight, W4A4.w)
    with pytest.raises(ValueError, match="already has quantized weights"):
        fold_scale(ctx, g, torch.ones(48))
    del ctx.qweights["self_attn.q_proj"]
    no_prev = type(g)("x", g.names, g.linears, None, None)
    with pytest.raises(ValueError, match="neither prev_norm nor"):
        fold_scale(ctx, no_prev, torch.ones(48))


def test_context_validation_and_helpers():
    layer = SyntheticLayer(dim=48, inter=40)
    ctx = make_context(layer, make_inputs(layer, 1, 8, seed=0), W4A4)
    assert output_error(ctx, "mlp.down_proj") > 0
    with pytest.raises(ValueError, match="stats has no entry"):
        LayerContext(layer=layer, groups=ctx.groups, stats={}, config=W4A4)
    with pytest.raises(TypeError, match="QuantSpec"):
        LayerContext(layer=layer, groups=ctx.groups, stats=ctx.stats, config=object())
    assert [linear_kind(n) for n in ctx.names()] == ["q", "k", "v", "o", "gate", "up", "down"]
    assert linear_kind("fc1") == "up" and linear_kind("self_attn.out_proj") == "o"
    with pytest.raises(ValueError, match="alpha"):
        check_number(float("nan"), "alpha", 0, 1)
