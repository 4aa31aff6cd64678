"""Stacked projections (`mixq.nn.stacked`, `mixq.hf.projection_fusion`): q/k/v and gate/up as
one GEMM each, equal to the unstacked model, same state_dict and checkpoints, one GEMM per group
in a compiled graph, clear errors for linears that cannot be stacked."""
import copy

import pytest
import torch
from torch import nn

import mixq
from mixq.config import QuantSpec
from mixq.nn import (QuantLinearBase, QuantNorm, StackedLinear, StackedPart, W4A4Linear,
                     W4A16Linear, W8A8Linear, stack_problem)

transformers = pytest.importorskip("transformers")

IDS = [[1, 7, 42, 300, 5, 99, 12, 3, 480, 64, 2]]


def _linears(n_out, k, bias, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in n_out:
        lin = nn.Linear(k, n, bias=bias)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(n, k, generator=g) * 0.05)
            if bias:
                lin.bias.copy_(torch.randn(n, generator=g) * 0.1)
        out.append(lin)
    return out


def _kernels(model, on):
    for m in model.modules():
        if isinstance(m, (QuantLinearBase, QuantNorm)):
            m.use_kernels = on
    return model


BUILDERS = {
    "w4a4-g128-outliers": lambda lin, idx: W4A4Linear.from_linear(lin, outlier_idx=idx),
    "w4a4-row": lambda lin, idx: W4A4Linear.from_linear(
        lin, weight_spec=QuantSpec(4, True, "row")),
    "w4a16-g32-asym": lambda lin, idx: W4A16Linear.from_linear(
        lin, weight_spec=QuantSpec(4, False, "group", 32)),
    "w8a8": lambda lin, idx: W8A8Linear.from_linear(lin),
}


@pytest.mark.parametrize("kind", sorted(BUILDERS))
@pytest.mark.parametrize("bias", [False, True])
def test_parts_equal_the_members(kind, bias, seed, device):
    """Awkward sizes (K=200 is no multiple of 128, N = 72/24/40); kernels on CUDA or under the
    interpreter, and the reference path on CPU."""
    k = 200
    idx = torch.tensor([3, 77, 150])
    members = [BUILDERS[kind](lin, idx).to(device) for lin in _linears((72, 24, 40), k, bias, seed)]
    x = torch.randn(5, 3, k, generator=torch.Generator().manual_seed(seed + 1)).to(device)
    use = [False] if device.type == "cpu" and kind.startswith("w4a16") else [False, True]
    for on in use:                       # W4A16's kernel reads fp16/bf16 only (fp32 x here)
        for m in members:
            m.use_kernels = on
        want = [m(x) for m in members]
        stack = StackedLinear(members, names=("q", "k", "v"))
        stack.fused.use_kernels = on
        parts = [StackedPart(stack, i) for i in range(3)]
        got = [p(x) for p in parts]
        for w, g in zip(want, got):
            assert g.shape == w.shape
            if on and device.type == "cuda":
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)   # tile configs may differ
            else:
                torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
        assert stack._outs is None and stack._key is None          # references dropped


def test_parts_recompute_for_another_input_or_an_in_place_change(seed):
    members = [BUILDERS["w4a4-row"](lin, None) for lin in _linears((16, 8), 64, False, seed)]
    stack = StackedLinear(members)
    q, k = StackedPart(stack, 0), StackedPart(stack, 1)
    calls = []
    real = stack.forward
    stack.forward = lambda x: calls.append(1) or real(x)
    x = torch.randn(2, 64)
    q(x)
    x.mul_(2)                                   # modified in place: the kept output is stale
    torch.testing.assert_close(k(x), members[1](x), rtol=0, atol=0)
    assert len(calls) == 2
    k(x)                                        # k again: k already took its slice -> recompute
    assert len(calls) == 3
    y = torch.randn(2, 64)
    q(y)
    torch.testing.assert_close(k(y.clone()), members[1](y), rtol=0, atol=0)  # another tensor
    assert len(calls) == 5


@pytest.mark.parametrize("case,match", [
    ("one", "at least two"),
    ("classes", "is W8A8Linear"),
    ("k", "in_features"),
    ("outliers", "another perm|outlier"),
    ("bias", "bias"),
    ("tile", "'tile' weight scales"),
    ("spec", "weight_spec"),
])
def test_stack_problems_are_named(case, match, seed):
    a, b = _linears((8, 8), 64, False, seed)
    w4 = lambda lin, **kw: W4A4Linear.from_linear(lin, **kw)  # noqa: E731
    if case == "one":
        ms = [w4(a)]
    elif case == "classes":
        ms = [w4(a), W8A8Linear.from_linear(b)]
    elif case == "k":
        ms = [w4(a), w4(_linears((8,), 32, False, seed)[0])]
    elif case == "outliers":
        ms = [w4(a, outlier_idx=torch.tensor([1])), w4(b, outlier_idx=torch.tensor([2]))]
    elif case == "bias":
        ms = [w4(a), w4(_linears((8,), 64, True, seed)[0])]
    elif case == "tile":
        t = QuantSpec(4, True, "tile")
        ms = [w4(a, weight_spec=t), w4(b, weight_spec=t)]
    else:
        ms = [w4(a), w4(b, weight_spec=QuantSpec(4, True, "row"))]
    problem = stack_problem(ms)
    assert problem is not None and __import__("re").search(match, problem), problem
    with pytest.raises(ValueError, match="cannot stack"):
        StackedLinear(ms)


def _quantized(float_llama, name):
    model = copy.deepcopy(float_llama)
    mixq.quantize(model, mixq.preset(name), progress=False)
    return model


@pytest.mark.parametrize("name", ["w4a4-o1-salient", "w4a16-g128", "w8a8"])
def test_fused_model_equals_unfused_and_keeps_the_state_dict(float_llama, name):
    base = _quantized(float_llama, name)
    fused = _quantized(float_llama, name + "+fuse")
    report = fused.mixq_fused_projections
    assert len(report) == 2 * len(fused.model.layers)
    assert all(v.startswith("stacked <- ") for v in report.values()), report
    attn = fused.model.layers[0].self_attn
    assert isinstance(attn.q_proj, StackedPart) and attn.q_proj.stack is attn.mixq_qkv
    ids = torch.tensor(IDS)
    with torch.no_grad():
        want, got = base(ids).logits, fused(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    sa, sb = base.state_dict(), fused.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # load_state_dict writes through the parts into the stacks
    other = _quantized(float_llama, name + "+fuse")
    with torch.no_grad():
        for v in fused.state_dict().values():
            if v.is_floating_point():
                v.mul_(0.5)
        other.load_state_dict(fused.state_dict())
        torch.testing.assert_close(other(ids).logits, fused(ids).logits, rtol=0, atol=0)
    # fewer launches: the stacks hold the only quantized q/k/v/gate/up modules
    kinds = [n.rsplit(".", 1)[-1] for n, m in fused.named_modules() if isinstance(m, QuantLinearBase)]
    assert kinds.count("fused") == 2 * len(fused.model.layers)


def test_mismatched_shared_buffer_load_is_refused(float_llama):
    model = _quantized(float_llama, "w4a4-o1-salient+fuse")
    sd = model.state_dict()
    key = "model.layers.0.self_attn.k_proj.perm"
    sd[key] = sd[key].flip(0)
    with pytest.raises(RuntimeError, match="share one perm"):
        model.load_state_dict(sd)


def test_save_load_round_trip_keeps_the_unstacked_layout(float_llama, tmp_path):
    fused = _quantized(float_llama, "w4a4-o1-salient+fuse")
    mixq.save_quantized(fused, tmp_path / "f")
    loaded = mixq.load_quantized(tmp_path / "f")
    assert isinstance(loaded.model.layers[1].mlp.up_proj, StackedPart)   # the config re-stacks
    ids = torch.tensor(IDS)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, fused(ids).logits, rtol=0, atol=0)
    # the checkpoint is the unstacked model's: it loads into a model quantized without +fuse
    import json
    meta = json.loads((tmp_path / "f" / "quant_config.json").read_text())
    assert "model.layers.0.self_attn.q_proj" in meta["modules"]
    assert not any("mixq_qkv" in n for n in meta["modules"])


def test_norm_fusion_hands_off_to_the_stack(float_llama):
    """+norm+fuse: the pre-norm's payload goes to the stacks (kernels under the interpreter on
    CPU); logits equal the unfused kernel model's."""
    base = _kernels(_quantized(float_llama, "w4a4-o1-salient"), True)
    both = _kernels(_quantized(float_llama, "w4a4-o1-salient+norm+fuse"), True)
    norm = both.model.layers[0].input_layernorm
    assert isinstance(norm, QuantNorm) and norm._consumer_ids == {
        id(both.model.layers[0].self_attn.mixq_qkv.fused)}
    taken = []
    from mixq.nn import norm as norm_mod
    real = norm_mod.QuantNorm._take
    orig = norm_mod.QuantNorm._take

    def spy(self, x, linear):
        r = real(self, x, linear)
        taken.append(r is not None)
        return r
    norm_mod.QuantNorm._take = spy
    try:
        ids = torch.tensor(IDS)
        with torch.no_grad():
            got = both(ids).logits
            want = base(ids).logits
    finally:
        norm_mod.QuantNorm._take = orig
    assert taken and all(taken)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fullgraph_compile_has_one_gemm_per_stack(float_llama, device):
    model = _kernels(_quantized(float_llama, "w4a4-o1-salient+fuse"), True).to(device)
    ids = torch.tensor(IDS, device=device)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(model, fullgraph=True, backend=backend, dynamic=False)
    with torch.no_grad():
        want = model(ids).logits
        got = compiled(ids).logits
    torch._dynamo.reset()
    assert not torch._dynamo.utils.counters["graph_break"]
    if device.type == "cpu":
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    code = "\n".join(g.code for g in graphs)
    n_layers = len(model.model.layers)
    # 4 quantized GEMMs per decoder layer: qkv, o, gate_up, down
    assert code.count("torch.ops.mixq.w4a4_gemm") == 4 * n_layers, code.count("w4a4_gemm")
