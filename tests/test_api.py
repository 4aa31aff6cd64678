"""mixq.api.quantize and mixq.config.QuantConfig on stories260k and a tiny random OPT."""
import copy
import dataclasses
import json
import math

import pytest
import torch
from torch import nn

from mixq import outliers, quant, reference
from mixq.api import quantize, regular_weight
from mixq.config import TARGETS, QuantConfig, QuantSpec
from mixq.nn import (FP16Linear, RotatedInputLinear, W4A4Linear, W4A16Linear, W8A8Linear,
                     quantize_linear)

transformers = pytest.importorskip("transformers")

LLAMA_NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _rel(a, b):
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------------- QuantConfig
def test_config_defaults_per_mode():
    c = QuantConfig()
    assert c.mode == "w4a4" and c.w == QuantSpec(4, True, "group", 128)
    assert c.a == QuantSpec(4, True, "row") and c.targets == TARGETS
    assert QuantConfig(mode="w4a16").a is None
    assert QuantConfig(mode="W8A8").w == QuantSpec(8, True, "row")
    assert QuantConfig(mode="fp16").w is None


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(mode="w3a3"), ValueError, "mode"),
    (dict(outlier_frac=0.7), ValueError, "outlier_frac"),
    (dict(outlier_frac=-0.1), ValueError, "outlier_frac"),
    (dict(outlier_frac=True), ValueError, "outlier_frac"),
    (dict(mode="w4a16", outlier_frac=0.01), ValueError, "w4a4"),
    (dict(outlier_strategy="biggest"), ValueError, "outlier_strategy"),
    (dict(targets=("q", "attn")), ValueError, "targets"),
    (dict(targets=()), ValueError, "targets"),
    (dict(targets="q"), TypeError, "targets"),
    (dict(skip=[1]), TypeError, "skip"),
    (dict(w=QuantSpec(8, True, "row")), ValueError, "bits <= 4"),
    (dict(w=QuantSpec(4, False, "row")), ValueError, "symmetric"),
    (dict(a=QuantSpec(4, True, "group", 64)), ValueError, "per token"),
    (dict(a=None), ValueError, "per-token"),
    (dict(mode="w4a16", a=QuantSpec(4, True, "row")), ValueError, "weight-only"),
    (dict(mode="w8a8", w=QuantSpec(4, True, "row")), ValueError, "int8"),
    (dict(w="int4"), TypeError, "QuantSpec"),
    (dict(methods=(object(),)), TypeError, "apply"),
    (dict(layer_overrides={"*.q_proj": QuantSpec(6, True, "row")}), ValueError, "bits"),
    (dict(layer_overrides={"*.q_proj": QuantSpec(8, True, "group", 64)}), ValueError, "row"),
    (dict(layer_overrides={"*.q_proj": 4}), TypeError, "QuantSpec"),
    (dict(quantize_lm_head=1), TypeError, "quantize_lm_head"),
])
def test_config_rejects(kwargs, err, match):
    with pytest.raises(err, match=match):
        QuantConfig(**kwargs)


def test_config_dict_round_trip():
    methods = pytest.importorskip("mixq.methods")
    c = QuantConfig(w=QuantSpec(4, True, "group", 64), outlier_frac=0.05,
                    outlier_strategy="mean3std", methods=(methods.SmoothQuant(), methods.GPTQ()),
                    targets=("q", "k", "down"), skip=("model.layers.0.*",),
                    layer_overrides={"*.down_proj": QuantSpec(8, True, "row")},
                    quantize_lm_head=True)
    d = json.loads(json.dumps(c.to_dict()))
    assert QuantConfig.from_dict(d) == c
    with pytest.raises(ValueError, match="unknown keys"):
        QuantConfig.from_dict({**d, "bogus": 1})
    bad = {**d, "methods": [{"class": "system", "module": "os", "params": {}}]}
    with pytest.raises(ValueError, match="mixq.methods"):
        QuantConfig.from_dict(bad)
    with pytest.raises(ValueError, match="QuantSpec"):
        QuantConfig.from_dict({**d, "w": {"bits": 4, "colour": "red"}})


# ------------------------------------------------------------------------------- quantize
def test_w4a4_llama_swaps_and_matches_reference(llama, float_llama, seed):
    calib = torch.randint(0, 512, (3, 40))
    frac = 0.05
    # independent calibration absmax of layer-0 inputs from one ordinary forward
    stat = {}

    def record(name, x):
        a = x.reshape(-1, x.shape[-1]).abs().amax(0)
        stat[name] = torch.maximum(stat[name], a) if name in stat else a
    hooks = [float_llama.model.layers[0].get_submodule(n).register_forward_pre_hook(
        lambda _m, a, n=n: record(n, a[0])) for n in LLAMA_NAMES]
    with torch.no_grad():
        for row in calib:
            float_llama(row[None])
    for h in hooks:
        h.remove()

    quantize(llama, QuantConfig(outlier_frac=frac), calib, progress=False)
    for i, layer in enumerate(llama.model.layers):
        for n in LLAMA_NAMES:
            m = layer.get_submodule(n)
            assert isinstance(m, W4A4Linear), f"layer {i} {n} is {type(m).__name__}"
            assert m.n_outliers == math.ceil(frac * m.in_features)
    assert type(llama.lm_head) is nn.Linear
    assert llama.lm_head.weight is llama.model.embed_tokens.weight
    assert llama.mixq_config.outlier_frac == frac and len(llama.mixq_report) == 35

    # layer 0: outliers are the calibration top-k, output = reference.w4a4_linear
    for n in LLAMA_NAMES:
        m = llama.model.layers[0].get_submodule(n)
        lin = float_llama.model.layers[0].get_submodule(n)
        k = math.ceil(frac * lin.in_features)
        assert torch.equal(m.outlier_idx, outliers.outliers_topk(stat[n], k=k))
        x = torch.randn(9, lin.in_features) * 3
        w_reg, perm = regular_weight(lin, m.outlier_idx, m.weight_spec)
        qt = quant.quantize(w_reg, m.weight_spec)
        kq = lin.in_features - k
        xp = x[:, perm]
        x_reg = torch.nn.functional.pad(xp[:, :kq], (0, w_reg.shape[1] - kq))
        ref = reference.w4a4_linear(x_reg, qt.q, qt.scale, group_size=128,
                                    x_out=xp[:, kq:].half(),
                                    w_out=lin.weight[:, perm[kq:]].detach().half())
        torch.testing.assert_close(m(x), ref)
        assert torch.equal(m.w_q, qt.q)


def test_generate_and_accuracy_order(llama, float_llama, seed):
    ids = torch.randint(0, 512, (2, 30))
    with torch.no_grad():
        ref = float_llama(ids).logits
    errs = {}
    for mode in ("w8a8", "w4a4"):
        m = copy.deepcopy(float_llama)
        quantize(m, QuantConfig(mode=mode), progress=False)
        with torch.no_grad():
            errs[mode] = _rel(m(ids).logits, ref)
        out = m.generate(ids[:1, :4], max_new_tokens=6, do_sample=False)
        assert out.shape == (1, 10) and torch.equal(out[:, :4], ids[:1, :4])
    assert 0 < errs["w8a8"] < errs["w4a4"]


@pytest.mark.parametrize("mode, cls", [("w4a16", W4A16Linear), ("w8a8", W8A8Linear),
                                       ("fp16", FP16Linear)])
def test_modes(llama, mode, cls):
    quantize(llama, QuantConfig(mode=mode), progress=False)
    assert all(isinstance(l.get_submodule(n), cls) for l in llama.model.layers for n in LLAMA_NAMES)
    with torch.no_grad():
        assert torch.isfinite(llama(torch.arange(20)[None]).logits).all()


def test_targets_skip_overrides_lm_head(llama):
    cfg = QuantConfig(targets=("q", "down", "o"), skip=("model.layers.1.*",),
                      layer_overrides={"*.down_proj": QuantSpec(8, True, "row"),
                                       "*.o_proj": QuantSpec(4, True, "row")},
                      quantize_lm_head=True)
    emb = llama.model.embed_tokens.weight.detach().clone()
    quantize(llama, cfg, progress=False)
    for i, layer in enumerate(llama.model.layers):
        kinds = {n: type(layer.get_submodule(n)) for n in LLAMA_NAMES}
        if i == 1:
            assert set(kinds.values()) == {nn.Linear}
            continue
        assert kinds["self_attn.q_proj"] is W4A4Linear and kinds["mlp.down_proj"] is W8A8Linear
        assert kinds["self_attn.k_proj"] is nn.Linear and kinds["mlp.up_proj"] is nn.Linear
        assert layer.self_attn.o_proj.weight_spec == QuantSpec(4, True, "row")
        assert layer.self_attn.q_proj.weight_spec == QuantSpec(4, True, "group", 128)
    assert isinstance(llama.lm_head, W4A4Linear)
    assert torch.equal(llama.model.embed_tokens.weight, emb)
    out = llama.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)


def test_opt_w4a4(tiny_opt, seed):
    model = tiny_opt()
    ref_model = copy.deepcopy(model)
    ids = torch.randint(0, 97, (2, 17))
    quantize(model, QuantConfig(outlier_frac=0.1, w=QuantSpec(4, True, "row")), ids,
             progress=False)
    names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
             "fc1", "fc2")
    for layer in model.model.decoder.layers:
        for n in names:
            m = layer.get_submodule(n)
            assert isinstance(m, W4A4Linear) and m.bias is not None
            assert m.n_outliers == math.ceil(0.1 * m.in_features)
    with torch.no_grad():
        out, ref = model(ids).logits, ref_model(ids).logits
    assert torch.isfinite(out).all() and 0 < _rel(out, ref) < 1


def test_salient_weight_strategy_needs_no_data(llama):
    quantize(llama, QuantConfig(outlier_frac=0.02, outlier_strategy="argmax"), progress=False)
    m = llama.model.layers[2].mlp.down_proj
    assert m.n_outliers == math.ceil(0.02 * 172)


def test_methods_integration(llama, seed):
    methods = pytest.importorskip("mixq.methods")
    ids = torch.randint(0, 512, (2, 24))
    quantize(llama, QuantConfig(outlier_frac=0.02, methods=(methods.GPTQ(),)), ids,
             progress=False)
    assert all(r["method_weights"] for r in llama.mixq_report.values())


def test_rotation_wraps_modules(float_llama, seed):
    methods = pytest.importorskip("mixq.methods")
    model = copy.deepcopy(float_llama)
    ids = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        ref = float_llama(ids).logits
    quantize(model, QuantConfig(mode="w4a16", methods=(methods.Rotation(),)), ids, progress=False)
    assert isinstance(model.model.layers[0].self_attn.q_proj, RotatedInputLinear)
    with torch.no_grad():
        assert _rel(model(ids).logits, ref) < 0.5


def test_errors(llama):
    ids = torch.randint(0, 512, (2, 8))
    with pytest.raises(ValueError, match="calib_data"):
        quantize(llama, QuantConfig(outlier_frac=0.01), progress=False)
    with pytest.raises(TypeError, match="QuantConfig"):
        quantize(llama, {"mode": "w4a4"})
    with pytest.raises(TypeError, match="dtype"):
        quantize(llama, QuantConfig(outlier_frac=0.01), ids.float(), progress=False)
    quantize(llama, QuantConfig(), progress=False)
    with pytest.raises(ValueError, match="already quantized"):
        quantize(llama, QuantConfig(), progress=False)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32)
    with pytest.raises(ValueError, match="supported"):
        quantize(transformers.GPT2LMHeadModel(cfg), QuantConfig())


def test_quantize_linear_qweight(seed):
    lin = nn.Linear(70, 9)
    cfg = QuantConfig(w=QuantSpec(4, True, "group", 32))
    idx = torch.tensor([3, 50])
    w_reg, _perm = regular_weight(lin, idx, cfg.w)
    assert w_reg.shape == (9, 96)
    qt = quant.quantize(w_reg * 0.5, cfg.w)           # a "method" result on the same layout
    m = quantize_linear(lin, "w4a4", weight_spec=cfg.w, outlier_idx=idx, act_bits=4, qweight=qt)
    assert torch.equal(m.w_q, qt.q) and torch.equal(m.w_packed, quant.pack_int4_blocked(qt.q, 128))
    with pytest.raises(ValueError, match="layout"):
        quantize_linear(lin, "w4a4", weight_spec=cfg.w, outlier_idx=torch.arange(40),
                        act_bits=4, qweight=qt)     # 30 int4 columns -> Kp = 32, not 96
    with pytest.raises(ValueError, match="W4A16"):
        quantize_linear(lin, "w4a16", weight_spec=cfg.w, outlier_idx=idx)


# ------------------------------------------------------------------------------- refused up front
def _snapshot(model):
    return ([(n, type(m)) for n, m in model.named_modules()],
            {k: v.clone() for k, v in model.state_dict().items()})


def _assert_untouched(model, snap):
    mods, state = snap
    assert [(n, type(m)) for n, m in model.named_modules()] == mods
    now = model.state_dict()
    assert set(now) == set(state) and all(torch.equal(now[k], state[k]) for k in state)
    for attr in ("mixq_config", "mixq_report", "mixq_layer_errors", "mixq_fused_norms"):
        assert not hasattr(model, attr), attr


@pytest.mark.parametrize("kwargs, match", [
    (dict(skip=("model.layers.9.*",)), r"skip patterns \['model.layers.9.\*'\] match no linear"),
    (dict(skip=("model.layers.0",)), r"skip patterns \['model.layers.0'\].*'model.layers.3.\*'"),
    (dict(skip=("*",)), "quantizes no linear"),
    (dict(targets=("q",), skip=("*.q_proj",)), "quantizes no linear"),
    (dict(quantize_lm_head=True, targets=("q",), skip=("*.q_proj", "lm_head")),
     "quantizes no linear"),
    (dict(layer_overrides={"*.mlp.fc1": QuantSpec(4, True, "row")}),
     r"layer_overrides patterns \['\*.mlp.fc1'\] match no linear"),
    (dict(layer_overrides={"*.down_proj": QuantSpec(8, True, "row"),
                           "*.dwon_proj": QuantSpec(4, True, "row")}), r"\['\*.dwon_proj'\]"),
], ids=["skip_no_layer", "skip_module_not_linear", "skip_all", "skip_all_targets",
        "skip_all_with_head", "override_opt_name", "override_typo"])
def test_patterns_that_match_nothing_are_refused(llama, kwargs, match):
    snap = _snapshot(llama)
    with pytest.raises(ValueError, match=match):
        quantize(llama, QuantConfig(**kwargs), progress=False)
    _assert_untouched(llama, snap)


@pytest.mark.parametrize("targets, match", [
    (("gate",), r"\['gate'\] match no linear of this 'opt'"), (("q", "gate"), r"\['gate'\]")])
def test_targets_the_family_lacks_are_refused(tiny_opt, targets, match):
    model = tiny_opt()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        quantize(model, QuantConfig(targets=targets), progress=False)
    _assert_untouched(model, snap)
    # the OPT names are aliases of o / up / down; all kinds (the default) need not all exist
    quantize(model, QuantConfig(targets=("out", "fc1")), progress=False)
    assert isinstance(model.model.decoder.layers[0].fc1, W4A4Linear)
    assert isinstance(model.model.decoder.layers[0].fc2, nn.Linear)
    quantize(tiny_opt(), QuantConfig(), progress=False)


def test_patterns_of_other_linears_are_fine(llama):
    """A pattern naming linears this config does not quantize (another kind, a skipped layer)
    is not an error: e.g. an ablation variant of a config with overrides."""
    cfg = QuantConfig(targets=("q",), skip=("*.down_proj", "model.layers.1.*"),
                      layer_overrides={"model.layers.1.*": QuantSpec(8, True, "row"),
                                       "*.mlp.*": QuantSpec(4, True, "row")})
    quantize(llama, cfg, progress=False)
    assert sorted(llama.mixq_report) == [f"model.layers.{i}.self_attn.q_proj" for i in (0, 2, 3, 4)]


def test_skip_applies_to_lm_head(llama):
    quantize(llama, QuantConfig(quantize_lm_head=True, skip=("lm_head",)), progress=False)
    assert type(llama.lm_head) is nn.Linear and "lm_head" not in llama.mixq_report
    assert llama.lm_head.weight is llama.model.embed_tokens.weight


def test_gptq_with_8bit_override_refused_before_any_layer(llama, seed):
    """GPTQ's int4 weights cannot become an 8-bit (W8A8) override: refused by the builder,
    now before layer 0 instead of at layer 1 with layer 0 already swapped."""
    methods = pytest.importorskip("mixq.methods")
    ids = torch.randint(0, 512, (2, 16))
    snap = _snapshot(llama)
    cfg = QuantConfig(methods=(methods.GPTQ(),),
                      layer_overrides={"*.layers.1.mlp.down_proj": QuantSpec(8, True, "row")})
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.down_proj: W8A8 takes no "
                                         r"method-quantized.*model is unchanged.*GPTQ"):
        quantize(llama, cfg, ids, progress=False)
    _assert_untouched(llama, snap)
    quantize(llama, QuantConfig(methods=(methods.GPTQ(),)), ids, progress=False)  # still usable


def test_weight_quantizer_selection_is_respected(llama, seed):
    """AdaRound only on q: an 8-bit override of down_proj is fine (no false refusal)."""
    methods = pytest.importorskip("mixq.methods")
    ids = torch.randint(0, 512, (2, 16))
    cfg = QuantConfig(methods=(methods.AdaRound(n_steps=2, kinds=("q",)),),
                      layer_overrides={"*.down_proj": QuantSpec(8, True, "row")})
    quantize(llama, cfg, ids, progress=False)
    assert isinstance(llama.model.layers[2].mlp.down_proj, W8A8Linear)
    assert llama.mixq_report["model.layers.2.self_attn.q_proj"]["method_weights"]


@dataclasses.dataclass(frozen=True)
class _EditThenFail:
    """A method that edits float weights and norms in place (as transforms do) on every layer
    and fails at layer `at`."""

    at: int = 2
    error: type = RuntimeError

    def apply(self, ctx):
        with torch.no_grad():
            for g in ctx.groups:
                for lin in g.linears:
                    lin.weight.mul_(2)
                if g.prev_norm is not None:
                    g.prev_norm.weight.add_(1)
            ctx.groups[0].linears[0].bias = nn.Parameter(torch.ones(
                ctx.groups[0].linears[0].out_features))
        if ctx.index == self.at:
            raise self.error("failed part-way")


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failure_part_way_restores_the_model(llama, float_llama, error, seed):
    ids = torch.randint(0, 512, (2, 16))
    snap = _snapshot(llama)
    with pytest.raises(error, match="failed part-way"):
        quantize(llama, QuantConfig(methods=(_EditThenFail(error=error),)), ids, progress=False)
    _assert_untouched(llama, snap)
    assert llama.model.layers[0].self_attn.q_proj.bias is None
    quantize(llama, QuantConfig(), progress=False)
    fresh = quantize(copy.deepcopy(float_llama), QuantConfig(), progress=False)
    assert torch.equal(llama(ids).logits, fresh(ids).logits)


def test_method_decided_refusal_restores_the_model(llama, seed):
    """LayerwiseQuant's 8-bit choice for layer 3 + GPTQ can only fail at layer 3 (the method
    decides per layer); SmoothQuant edited the norms of layers 0-3 by then: all restored."""
    methods = pytest.importorskip("mixq.methods")
    ids = torch.randint(0, 512, (2, 16))
    snap = _snapshot(llama)
    cfg = QuantConfig(methods=(methods.SmoothQuant(), methods.LayerwiseQuant(layers=(3,)),
                               methods.GPTQ()))
    with pytest.raises(ValueError, match="model.layers.3.mlp.down_proj: W8A8"):
        quantize(llama, cfg, ids, progress=False)
    _assert_untouched(llama, snap)


def test_failure_after_the_head_restores_head_attention_and_norms(llama, monkeypatch, seed):
    import mixq.api as api
    from mixq.config import AttentionQuantConfig

    snap = _snapshot(llama)
    impl = llama.config._attn_implementation

    def boom(model):
        raise RuntimeError("fusing failed")
    monkeypatch.setattr(api, "fuse_norm_quant", boom)
    cfg = QuantConfig(quantize_lm_head=True, attention=AttentionQuantConfig(), fuse_norm=True)
    with pytest.raises(RuntimeError, match="fusing failed"):
        quantize(llama, cfg, progress=False)
    _assert_untouched(llama, snap)
    assert llama.lm_head.weight is llama.model.embed_tokens.weight
    assert llama.config.tie_word_embeddings is True
    assert llama.config._attn_implementation == impl
    assert not any(hasattr(m, "mixq_attention_config") for m in llama.modules())
