"""mixq.attention: the reference equals HF eager attention with quantization off, quantizes as
documented with it on, and the HF registration switches Llama / OPT models in and out."""
import types

import pytest
import torch

import mixq.kernels.attention as ka
from mixq.config import FLOAT_ATTENTION, AttentionQuantConfig
from mixq.reference.attention import attention_scores, quantize_heads, quantized_attention_reference
from mixq.hf.attention import disable_quantized_attention, enable_quantized_attention

transformers = pytest.importorskip("transformers")
from transformers.models.llama.modeling_llama import eager_attention_forward  # noqa: E402

NEG = torch.finfo(torch.float32).min


def _qkv(b, hq, hkv, lq, lk, d):
    return (torch.randn(b, hq, lq, d), torch.randn(b, hkv, lk, d) * 2, torch.randn(b, hkv, lk, d))


def _hf_mask(lengths, lq, lk):
    """HF eager mask: causal (bottom-right) and left padding (row b has lengths[b] real keys)."""
    i = torch.arange(lq)[:, None] + (lk - lq)
    j = torch.arange(lk)[None, :]
    mask = torch.where(j <= i, 0.0, NEG).expand(len(lengths), 1, lq, lk).clone()
    for row, n in enumerate(lengths):
        mask[row, :, :, :lk - n] = NEG
    return mask


def _eager(q, k, v, mask, scaling):
    module = types.SimpleNamespace(num_key_value_groups=q.shape[1] // k.shape[1], training=False)
    return eager_attention_forward(module, q, k, v, mask, scaling=scaling)[0]


@pytest.mark.parametrize("b,hq,hkv,lq,lk,d,lengths", [
    (1, 4, 4, 9, 9, 16, None),                 # causal, no padding
    (3, 6, 3, 7, 7, 24, (7, 4, 2)),            # left padding, GQA 2:1, a batch of lengths
    (2, 5, 5, 1, 12, 64, (12, 9)),             # a decode step against a longer cache
    (2, 2, 1, 3, 8, 8, (8, 5)),                # a chunk of 3 queries, GQA 2:1
])
def test_float_reference_equals_hf_eager(b, hq, hkv, lq, lk, d, lengths, seed):
    q, k, v = _qkv(b, hq, hkv, lq, lk, d)
    mask = _hf_mask(lengths or (lk,) * b, lq, lk)
    want = _eager(q, k, v, mask, d ** -0.5)
    got = quantized_attention_reference(q, k, v, mask, scaling=d ** -0.5, config=FLOAT_ATTENTION)
    torch.testing.assert_close(got, want)
    if lengths is None:                         # no mask: causal from is_causal
        got = quantized_attention_reference(q, k, v, None, scaling=d ** -0.5, config=FLOAT_ATTENTION)
        torch.testing.assert_close(got, want)


def test_bool_mask_equals_additive(seed):
    q, k, v = _qkv(2, 2, 2, 5, 5, 16)
    mask = _hf_mask((5, 3), 5, 5)
    got = quantized_attention_reference(q, k, v, mask == 0, scaling=0.25)
    want = quantized_attention_reference(q, k, v, mask, scaling=0.25)
    torch.testing.assert_close(got, want)


def test_integer_scores_are_exact(seed):
    q, k, _ = _qkv(2, 4, 2, 5, 7, 32)
    for bits in (4, 8):
        s = attention_scores(q, k, scaling=0.125, q_bits=bits, k_bits=bits)
        q_c, q_s = quantize_heads(q, bits)
        k_c, k_s = quantize_heads(k, bits)
        acc = torch.einsum("bhqd,bhkd->bhqk", q_c.long(), k_c.long().repeat_interleave(2, dim=1))
        want = acc.float() * (q_s.float() * 0.125)[..., None] * k_s.float().repeat_interleave(2, 1)[..., None, :]
        assert torch.equal(s, want)


def test_quantization_error_shrinks_with_bits(seed):
    q, k, v = _qkv(2, 4, 4, 12, 12, 32)
    want = quantized_attention_reference(q, k, v, None, scaling=32 ** -0.5, config=FLOAT_ATTENTION)
    errs = [float((quantized_attention_reference(q, k, v, None, scaling=32 ** -0.5,
                                                 config=AttentionQuantConfig(b, b, b, b)) - want).norm())
            for b in (4, 8)]
    assert errs[1] < errs[0] < float(want.norm())


def test_p_codes_give_weights_summing_to_one(seed):
    """A constant V is returned exactly: the weights P_c / sum(P_c) sum to 1."""
    q, k, _ = _qkv(1, 2, 2, 6, 6, 16)
    v = torch.full((1, 2, 6, 16), 0.75)
    for p_bits in (4, 8):
        cfg = AttentionQuantConfig(8, 8, None, p_bits)
        out = quantized_attention_reference(q, k, v, None, scaling=0.25, config=cfg)
        torch.testing.assert_close(out, torch.full_like(out, 0.75), rtol=0, atol=1e-6)


def test_config_validation():
    for bad in (3, 16, 0):
        with pytest.raises(ValueError, match="q_bits"):
            AttentionQuantConfig(q_bits=bad)
    with pytest.raises(ValueError, match="p_bits"):
        AttentionQuantConfig(p_bits=2)
    with pytest.raises(TypeError, match="k_bits"):
        AttentionQuantConfig(k_bits=8.0)
    with pytest.raises(TypeError, match="use_kernels"):
        AttentionQuantConfig(use_kernels="yes")
    with pytest.raises(Exception):
        AttentionQuantConfig().q_bits = 4                  # frozen


def test_reference_bad_inputs(seed):
    q, k, v = _qkv(1, 2, 1, 3, 4, 8)
    with pytest.raises(TypeError, match="dtype"):
        quantized_attention_reference(q.long(), k, v, scaling=1.0)
    with pytest.raises(ValueError, match="non-finite"):
        quantized_attention_reference(q, k.clone().fill_(float("inf")), v, scaling=1.0)
    with pytest.raises(ValueError, match="dims"):
        quantized_attention_reference(q[0], k, v, scaling=1.0)
    with pytest.raises(ValueError, match="one shape"):
        quantized_attention_reference(q, k, v[:, :, :2], scaling=1.0)
    with pytest.raises(ValueError, match="Hkv"):
        quantized_attention_reference(torch.randn(1, 3, 3, 8), k.repeat(1, 2, 1, 1),
                                      v.repeat(1, 2, 1, 1), scaling=1.0)
    with pytest.raises(ValueError, match="attention_mask"):
        quantized_attention_reference(q, k, v, torch.zeros(1, 1, 2, 4), scaling=1.0)
    with pytest.raises(ValueError, match="NaN"):
        quantized_attention_reference(q, k, v, torch.full((1, 1, 3, 4), float("nan")), scaling=1.0)
    with pytest.raises(ValueError, match="scaling"):
        quantized_attention_reference(q, k, v, scaling=0.0)
    with pytest.raises(ValueError, match="empty"):
        quantized_attention_reference(q[:, :, :0], k, v, scaling=1.0)


# ------------------------------------------------------------------------------- HF models
def _padded_batch(tok):
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok(["Once upon a time there was", "The cat"], return_tensors="pt", padding=True)


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_llama_float_config_equals_eager(llama, tok):
    batch = _padded_batch(tok)
    llama.set_attn_implementation("eager")
    want = _logits(llama, batch)
    enable_quantized_attention(llama, AttentionQuantConfig(None, None, None, None, use_kernels=False))
    assert llama.config._attn_implementation == "mixq"
    got = _logits(llama, batch)
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-5, atol=1e-5)
    disable_quantized_attention(llama)
    assert llama.config._attn_implementation == "eager"
    torch.testing.assert_close(_logits(llama, batch), want)


def test_opt_float_config_equals_eager(tiny_opt):
    model = tiny_opt()
    model.set_attn_implementation("eager")
    ids = torch.tensor([[5, 9, 13, 2, 40, 41], [0, 0, 7, 8, 9, 10]])
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    want = _logits(model, batch)
    enable_quantized_attention(model, FLOAT_ATTENTION)
    got = _logits(model, batch)
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-5, atol=1e-5)
    enable_quantized_attention(model, AttentionQuantConfig(4, 4, 4, 4))   # re-enable: new config
    quant = _logits(model, batch)
    assert not torch.equal(quant[keep], want[keep])
    assert float((quant[keep] - want[keep]).abs().max()) < float(want[keep].abs().max())
    disable_quantized_attention(model)
    with pytest.raises(ValueError, match="not enabled"):
        disable_quantized_attention(model)


def test_use_kernels_dispatches_to_the_kernel(llama, tok, monkeypatch):
    calls = []

    def spy(query, key, value, attention_mask, *, scaling, config, is_causal, **kw):
        calls.append(query.shape)
        return quantized_attention_reference(query, key, value, attention_mask, scaling=scaling,
                                             config=config, is_causal=is_causal)

    monkeypatch.setattr(ka, "quantized_attention", spy)
    batch = _padded_batch(tok)
    enable_quantized_attention(llama, AttentionQuantConfig(use_kernels=False))
    want = _logits(llama, batch)
    assert not calls
    enable_quantized_attention(llama, AttentionQuantConfig(use_kernels=True))
    got = _logits(llama, batch)
    assert len(calls) == llama.config.num_hidden_layers
    torch.testing.assert_close(got, want)


def test_enable_bad_inputs(llama):
    with pytest.raises(TypeError, match="model"):
        enable_quantized_attention(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="config"):
        enable_quantized_attention(llama, {"q_bits": 8})


@pytest.mark.parametrize("q_len,kv_len,q_offset,pad", [(5, 5, 0, 0), (1, 9, 8, 0), (4, 12, 8, 3),
                                                       (3, 3, 0, 1)])
def test_additive_mask_equals_hf_eager_mask(q_len, kv_len, q_offset, pad):
    """The capture-safe mask of the "mixq" attention has HF's eager_mask values and shape
    (causal, decode with a cache offset, left padding)."""
    from transformers.masking_utils import eager_mask

    from mixq.hf.attention import additive_mask
    am = torch.ones(2, kv_len, dtype=torch.bool)
    am[1, :pad] = False
    args = dict(batch_size=2, q_length=q_len, kv_length=kv_len, q_offset=q_offset,
                attention_mask=am, dtype=torch.float32)
    want = eager_mask(**args)
    got = additive_mask(**args)
    assert got.shape == want.shape == (2, 1, q_len, kv_len) and torch.equal(got, want)
    half = additive_mask(2, q_len, kv_len, q_offset, dtype=torch.bfloat16)  # positional too
    assert half.dtype == torch.bfloat16 and torch.equal(half, eager_mask(2, q_len, kv_len, q_offset,
                                                                         dtype=torch.bfloat16))
