"""mixq.nn.norm and mixq.hf.norm_fusion: QuantNorm replaces a model norm, and its payload
replaces the consumers' own act_quant with bit-identical results (the `handoff` fixture counts
payloads taken and act_quant calls made)."""
import pytest
import torch
from torch import nn

import mixq.kernels.act_quant as aq
from mixq import nn as qnn
from mixq.config import QuantSpec
from mixq.nn.norm import QuantNorm, attach_consumers, take_prequantized
from mixq.hf.norm_fusion import fuse_norm_quant
from mixq.reference.norm import norm_reference, quantize_normed_reference

ROW = QuantSpec(4, True, "row")


@pytest.fixture
def handoff(monkeypatch):
    """Counts payloads taken and act_quant calls made by W4A4 linears (see module docstring)."""
    stats = {"taken": 0, "act_quant": 0}
    real_act_quant, real_take = aq.act_quant, take_prequantized

    def counting_act_quant(*args, **kwargs):
        stats["act_quant"] += 1
        return real_act_quant(*args, **kwargs)

    def counting_take(x, linear):
        out = real_take(x, linear)
        stats["taken"] += out is not None
        return out

    monkeypatch.setattr(aq, "act_quant", counting_act_quant)
    monkeypatch.setattr("mixq.nn.linear.take_prequantized", counting_take)
    return stats


def _linears(k, n_list, idx, device, spec=ROW, seed_bias=True):
    out = []
    for n in n_list:
        lin = nn.Linear(k, n, bias=seed_bias).to(device)
        q = qnn.W4A4Linear.from_linear(lin, weight_spec=spec, outlier_idx=idx.clone())
        q.use_kernels = True
        out.append(q)
    return out


def _rms(k, device, dtype=torch.bfloat16):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    norm = LlamaRMSNorm(k, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(k) + 0.5)
    return norm.to(device=device, dtype=dtype)


def _hidden(shape, device, dtype=torch.bfloat16):
    x = torch.randn(*shape, device=device) * 2
    x[..., :3] *= 20
    return x.to(dtype)


def test_from_norm_keeps_the_module_output(device, seed):
    pytest.importorskip("transformers")
    rms = _rms(48, device)
    ln = nn.LayerNorm(48, eps=1e-5).to(device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        ln.bias.normal_()
    x = _hidden((2, 5, 48), device)
    q_rms, q_ln = QuantNorm.from_norm(rms), QuantNorm.from_norm(ln)
    with torch.no_grad():
        assert torch.equal(q_rms(x), rms(x))               # the HF ops, no consumers: unfused
        torch.testing.assert_close(q_ln(x), ln(x), rtol=1e-2, atol=1e-2)
    assert q_rms.state_dict().keys() == rms.state_dict().keys()
    assert q_ln.state_dict().keys() == ln.state_dict().keys()


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_kernel_path_output_and_payload(kind, device, seed):
    pytest.importorskip("transformers")
    k = 64
    norm = _rms(k, device) if kind == "rms" else nn.LayerNorm(k).to(device, torch.bfloat16)
    idx = torch.tensor([50, 2, 17], device=device)
    qn = QuantNorm.from_norm(norm, outlier_idx=idx)
    qn.use_kernels = True
    lins = _linears(k, [16, 8], idx, device)
    attach_consumers(qn, lins)
    x = _hidden((3, 5, k), device)
    with torch.no_grad():
        h = qn(x)
        torch.testing.assert_close(h, norm(x), rtol=1e-2, atol=1e-2)
    h2 = h.reshape(-1, k)
    want = quantize_normed_reference(h2.cpu(), outlier_idx=idx.sort().values.cpu(),
                                     out_format="int8")
    got = take_prequantized(h2, lins[0])                    # a reshape of the output is fine
    assert got is not None
    for a, b in zip(got, want):
        assert torch.equal(a.cpu(), b)
    assert take_prequantized(h2, lins[0]) is None           # each consumer takes it once
    assert take_prequantized(h.clone(), lins[1]) is None    # another tensor: no payload
    assert take_prequantized(h, lins[1]) is not None
    assert qn._handoff is None                              # released after the last consumer


def test_inplace_change_or_stranger_gets_no_payload(device, seed):
    pytest.importorskip("transformers")
    idx = torch.tensor([1, 9], device=device)
    qn = QuantNorm.from_norm(_rms(32, device), outlier_idx=idx)
    qn.use_kernels = True
    lin, stranger = _linears(32, [8, 8], idx, device)
    attach_consumers(qn, [lin])
    with torch.no_grad():
        h = qn(_hidden((4, 32), device))
        assert take_prequantized(h, stranger) is None
        h.mul_(2)                                           # bumps the version counter
        assert take_prequantized(h, lin) is None
    qn.use_kernels = False
    with torch.no_grad():
        h = qn(_hidden((4, 32), device))
    assert take_prequantized(h, lin) is None                # reference path: no payload


@pytest.mark.parametrize("spec,k,idx", [
    (ROW, 64, [3, 60, 31]),
    (QuantSpec(4, True, "group", group_size=128), 140, [0, 7, 100, 139]),   # Kq=136 -> Kp=256
])
def test_handoff_gives_the_unfused_linear_output(spec, k, idx, handoff, device, seed):
    pytest.importorskip("transformers")
    idx = torch.tensor(idx, device=device)
    qn = QuantNorm.from_norm(_rms(k, device), outlier_idx=idx)
    qn.use_kernels = True
    lins = _linears(k, [24, 8, 8], idx, device, spec=spec)
    attach_consumers(qn, lins)
    x = _hidden((2, 3, k), device)
    with torch.no_grad():
        h = qn(x)
        unfused = [lin(h.clone()) for lin in lins]          # a copy: each quantizes itself
        calls = handoff["act_quant"]
        fused = [lin(h) for lin in lins]
    assert handoff["taken"] == 3
    assert handoff["act_quant"] == calls, "a consumer ran its own act_quant"
    for a, b in zip(fused, unfused):
        assert torch.equal(a, b)


def _quantize_block_linears(model, adapter, device, mismatch=None):
    """Swap every linear of every layer for a row-wise W4A4Linear; one outlier set per group
    (the api's calib_max behaviour); `mismatch` = a linear name that gets its own set."""
    for layer in adapter.layers(model):
        for g in adapter.linear_groups(layer):
            idx = torch.randperm(g.in_features, device=device)[:3]
            for name, lin in zip(g.names, g.linears):
                own = torch.randperm(g.in_features, device=device)[:3] if name == mismatch else idx
                q = qnn.W4A4Linear.from_linear(lin, weight_spec=ROW, outlier_idx=own)
                q.use_kernels = True
                layer.set_submodule(name, q)


def _tiny_llama(device):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval().to(device)


def _use_kernels(model):
    for m in model.modules():
        if isinstance(m, QuantNorm):
            m.use_kernels = True


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_fuse_norm_quant_on_a_model(family, handoff, tiny_opt, device, seed):
    from mixq.hf.models import get_adapter
    model = _tiny_llama(device) if family == "llama" else tiny_opt().to(device)
    adapter = get_adapter(model)
    _quantize_block_linears(model, adapter, device)
    ids = torch.randint(0, 61, (1, 6), device=device)
    with torch.no_grad():
        want = model(ids).logits
    report = fuse_norm_quant(model)
    fused = [n for n, r in report.items() if r.startswith("fused")]
    n_layers = len(adapter.layers(model))
    assert len(fused) == 2 * n_layers, report
    assert all(isinstance(model.get_submodule(n), QuantNorm) for n in fused)
    _use_kernels(model)
    with torch.no_grad():
        got = model(ids).logits
    per_layer = 5 if family == "llama" else 4              # q, k, v + gate, up | q, k, v + fc1
    assert handoff["taken"] == per_layer * n_layers
    # same model math; only the norm's fp32 sum order differs from torch's
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    assert all(r.startswith("skipped") for r in fuse_norm_quant(model).values())


def test_fuse_skips_groups_without_a_shared_outlier_set(device, seed):
    from mixq.hf.models import get_adapter
    model = _tiny_llama(device)
    adapter = get_adapter(model)
    _quantize_block_linears(model, adapter, device, mismatch="self_attn.k_proj")
    report = fuse_norm_quant(model)
    assert "other outlier channels" in report["model.layers.0.input_layernorm"]
    assert report["model.layers.0.post_attention_layernorm"].startswith("fused")
    model = _tiny_llama(device)
    _quantize_block_linears(model, adapter, device, mismatch="mlp.up_proj")
    with pytest.raises(ValueError, match="post_attention_layernorm"):
        fuse_norm_quant(model, strict=True)


def test_bad_inputs(device):
    pytest.importorskip("transformers")
    with pytest.raises(TypeError, match="RMSNorm"):
        QuantNorm.from_norm(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="last dim"):
        QuantNorm.from_norm(nn.LayerNorm((4, 4)))
    with pytest.raises(ValueError, match="at least one"):
        QuantNorm(torch.ones(3), outlier_idx=torch.arange(3))
    with pytest.raises(ValueError, match="duplicate"):
        QuantNorm(torch.ones(8), outlier_idx=torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="non-finite"):
        QuantNorm(torch.full((8,), float("nan")))
    with pytest.raises(ValueError, match="eps"):
        QuantNorm(torch.ones(8), eps=-1.0)
    qn = QuantNorm.from_norm(_rms(32, device), outlier_idx=torch.tensor([4, 5], device=device))
    with pytest.raises(ValueError, match=r"\(\.\.\., 32\)"):
        qn(torch.randn(2, 31, device=device))
    with pytest.raises(TypeError, match="dtype"):
        qn(torch.ones(2, 32, dtype=torch.int32, device=device))
    with pytest.raises(TypeError, match="QuantNorm"):
        attach_consumers(nn.LayerNorm(32), [])
    other = _linears(32, [8], torch.tensor([4, 6], device=device), device)
    with pytest.raises(ValueError, match="other outlier channels"):
        attach_consumers(qn, other)
    with pytest.raises(ValueError, match="not W4A4Linear"):
        attach_consumers(qn, [nn.Linear(32, 8)])
    tile = qnn.W4A4Linear.from_linear(nn.Linear(32, 8), outlier_idx=torch.tensor([4, 5]),
                                      weight_spec=QuantSpec(4, True, "tile"))
    with pytest.raises(ValueError, match="kernel path"):
        attach_consumers(qn, [tile.to(device)])


def test_reference_norm_matches_layer_norm():
    x = torch.randn(5, 40)
    ln = nn.LayerNorm(40)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 2)
        ln.bias.normal_()
        torch.testing.assert_close(norm_reference(x, ln.weight, ln.bias, kind="layer", eps=ln.eps),
                                   ln(x), rtol=1e-5, atol=1e-5)
