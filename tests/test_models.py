"""mixq.models: family adapters, linear groups and the GQA channel map."""
import pytest
import torch
from torch import nn

from mixq.hf.models import (LinearGroup, LlamaAdapter, OPTAdapter, SUPPORTED_MODEL_TYPES, get_adapter, linear_kind)

transformers = pytest.importorskip("transformers")


def test_llama_groups(float_llama):
    adapter = get_adapter(float_llama)
    assert isinstance(adapter, LlamaAdapter)
    layers = adapter.layers(float_llama)
    assert layers is float_llama.model.layers
    assert len(layers) == float_llama.config.num_hidden_layers
    assert adapter.layer_prefix(3) == "model.layers.3"
    for layer in layers:
        groups = adapter.linear_groups(layer)
        assert [g.kind for g in groups] == ["attn_in", "attn_out", "mlp_in", "mlp_out"]
        for g in groups:
            assert all(layer.get_submodule(n) is lin for n, lin in zip(g.names, g.linears))
            assert len({lin.in_features for lin in g.linears}) == 1
        a_in, a_out, m_in, m_out = groups
        assert a_in.names == ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
        assert a_in.prev_norm is layer.input_layernorm and a_in.prev_linear is None
        assert a_out.prev_linear is layer.self_attn.v_proj and a_out.prev_norm is None
        assert m_in.names == ("mlp.gate_proj", "mlp.up_proj")
        assert m_in.prev_norm is layer.post_attention_layernorm
        assert m_out.prev_linear is layer.mlp.up_proj and m_out.in_features == 172


def test_gqa_channel_map_folds_exactly(float_llama, seed):
    """Scaling v_proj row r by s_r and o_proj column c by 1/s_map[c] keeps the layer's output."""
    import copy
    layer = copy.deepcopy(float_llama.model.layers[1])
    groups = get_adapter(float_llama).linear_groups(layer)
    a_out = groups[1]
    cmap = a_out.prev_channel_map
    n_kv = layer.self_attn.v_proj.out_features
    assert cmap is not None and cmap.shape == (layer.self_attn.o_proj.in_features,)
    assert torch.equal(torch.bincount(cmap, minlength=n_kv),
                       torch.full((n_kv,), cmap.numel() // n_kv))
    h = torch.randn(2, 11, 64)
    pos = torch.arange(11)[None].expand(2, -1)
    emb = float_llama.model.rotary_emb(h, pos)
    with torch.no_grad():
        ref = layer(h, position_embeddings=emb, position_ids=pos)
        s = torch.rand(n_kv) + 0.5
        layer.self_attn.v_proj.weight.mul_(s[:, None])
        layer.self_attn.o_proj.weight.div_(s[cmap][None, :])
        out = layer(h, position_embeddings=emb, position_ids=pos)
    ref = ref[0] if isinstance(ref, tuple) else ref
    out = out[0] if isinstance(out, tuple) else out
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pre_norm", [True, False])
def test_opt_groups(pre_norm, tiny_opt):
    model = tiny_opt(pre_norm)
    adapter = get_adapter(model)
    assert isinstance(adapter, OPTAdapter)
    layers = adapter.layers(model)
    assert layers is model.model.decoder.layers
    layer = layers[0]
    groups = adapter.linear_groups(layer)
    assert [g.names for g in groups] == [
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",),
        ("fc1",), ("fc2",)]
    assert groups[1].prev_linear is layer.self_attn.v_proj and groups[1].prev_channel_map is None
    assert groups[3].prev_linear is None and groups[3].prev_norm is None
    if pre_norm:
        assert groups[0].prev_norm is layer.self_attn_layer_norm
        assert groups[2].prev_norm is layer.final_layer_norm
    else:
        assert groups[0].prev_norm is None and groups[2].prev_norm is None


def test_unknown_family_raises():
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32)
    with pytest.raises(ValueError, match="supported model_type") as e:
        get_adapter(transformers.GPT2LMHeadModel(cfg))
    assert "llama" in str(e.value) and "opt" in str(e.value)
    with pytest.raises(ValueError, match="unsupported"):
        get_adapter(nn.Linear(3, 3))
    with pytest.raises(TypeError, match="nn.Module"):
        get_adapter("llama")
    assert {"llama", "mistral", "qwen2", "opt"} <= set(SUPPORTED_MODEL_TYPES)


def test_linear_kind():
    assert [linear_kind(n) for n in ("self_attn.q_proj", "mlp.down_proj", "self_attn.out_proj",
                                     "fc1", "fc2", "mlp.gate_proj")] == \
        ["q", "down", "o", "up", "down", "gate"]


def test_linear_group_in_features():
    lin = nn.Linear(7, 3)
    g = LinearGroup("mlp_out", ("fc2",), (lin,))
    assert g.in_features == 7 and g.prev_norm is None and g.prev_channel_map is None
