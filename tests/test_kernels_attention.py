"""mixq.kernels.attention: prefill and KV4-decode kernels against mixq.attention's reference.

Tolerances (see the kernel module docstring): the row max m of S is compared exactly when QK^T
runs on integer codes (exact int32 dot, scales applied in the reference's order); a P code may
move by one when Triton's and torch's exp differ by an ulp at a rounding boundary, which moves
O by at most max|V_dq| / pmax per moved code, so O gets ``atol = 2 max|V_dq| / pmax`` plus a
mean-error check at fp32-rounding level; without P quantization only fp32 summation order
differs (assert_close's fp32 defaults).
"""
import dataclasses

import pytest
import torch

import mixq.kernels.attention as ka
from mixq.config import FLOAT_ATTENTION, AttentionQuantConfig
from mixq.reference.attention import attention_scores, prepare_mask, quantized_attention_reference
from mixq.kernels.attention import kv4_decode_attention, quantized_attention
from mixq.reference.kv_cache import dequantize_kv, pack_codes, quantize_heads, quantize_keys

NEG = torch.finfo(torch.float32).min


def _qkv(b, hq, hkv, lq, lk, d, device, dtype=torch.float32):
    q = torch.randn(b, hq, lq, d, device=device) * 2
    k = torch.randn(b, hkv, lk, d, device=device)
    k[..., 3] *= 8                                              # an outlier channel
    v = torch.randn(b, hkv, lk, d, device=device)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _padding_mask(b, lq, lk, device):
    """HF-style additive mask: causal (bottom-right) plus left padding of row i by i tokens."""
    i = torch.arange(lq, device=device)[:, None] + (lk - lq)
    j = torch.arange(lk, device=device)[None, :]
    mask = torch.where(j <= i, 0.0, NEG).expand(b, 1, lq, lk).clone()
    for row in range(b):
        mask[row, :, :, :row] = NEG
    return mask


def _check_output(got, ref, value, config):
    got, ref = got.float().cpu(), ref.float().cpu()
    if config.p_bits is None:
        torch.testing.assert_close(got, ref)
        return
    pmax = 2 ** config.p_bits - 1
    atol = 2 * float(value.float().abs().max()) / pmax
    torch.testing.assert_close(got, ref, atol=atol, rtol=0)
    assert float((got - ref).abs().mean()) <= 1e-5 * float(value.float().abs().max()) + atol / 100


PREFILL_CASES = [
    # b, hq, hkv, lq, lk, d, mask, config
    (1, 3, 3, 7, 7, 64, "causal", AttentionQuantConfig()),
    (2, 6, 3, 5, 13, 24, "padding", AttentionQuantConfig(4, 4, 4, 4)),
    (1, 4, 2, 19, 19, 16, "padding", AttentionQuantConfig(8, 4, 8, 8)),
    (2, 2, 1, 3, 11, 40, "causal", AttentionQuantConfig(8, None, 4, 8)),
    (1, 5, 5, 9, 9, 32, "padding", FLOAT_ATTENTION),
    (1, 2, 1, 35, 35, 16, "causal", AttentionQuantConfig()),   # query tiles skip future keys
]


@pytest.mark.parametrize("b,hq,hkv,lq,lk,d,mask_kind,config", PREFILL_CASES)
def test_prefill_matches_reference(b, hq, hkv, lq, lk, d, mask_kind, config, device, seed):
    q, k, v = _qkv(b, hq, hkv, lq, lk, d, device)
    mask = _padding_mask(b, lq, lk, device) if mask_kind == "padding" else None
    scaling = d ** -0.5
    got, row_max, row_sum = quantized_attention(q, k, v, mask, scaling=scaling, config=config,
                                                return_stats=True)
    ref = quantized_attention_reference(q, k, v, mask, scaling=scaling, config=config)
    assert got.shape == (b, lq, hq, d) and got.dtype == q.dtype
    _check_output(got, ref, v, config)
    s = attention_scores(q, k, scaling=scaling, q_bits=config.q_bits, k_bits=config.k_bits)
    s = s + prepare_mask(mask, b, lq, lk, True, q.device)
    if config.int_qk:                                      # integer QK^T: S and m are exact
        assert torch.equal(row_max.cpu(), s.amax(-1).cpu())
    else:
        torch.testing.assert_close(row_max.cpu(), s.amax(-1).cpu())
    if config.p_bits is not None:                          # l = sum of integer codes
        e = torch.round(torch.exp(s - s.amax(-1, keepdim=True)) * (2 ** config.p_bits - 1))
        assert float((row_sum.cpu() - e.sum(-1).cpu()).abs().max()) <= 2
        assert torch.equal(row_sum.cpu(), row_sum.cpu().round())


def test_prefill_half_precision_and_bool_mask(device, seed):
    q, k, v = _qkv(1, 2, 2, 6, 6, 16, device, torch.bfloat16)
    allowed = torch.ones(1, 1, 6, 6, dtype=torch.bool, device=device).tril()
    cfg = AttentionQuantConfig()
    got = quantized_attention(q, k, v, allowed, scaling=0.25, config=cfg)
    ref = quantized_attention_reference(q, k, v, None, scaling=0.25, config=cfg)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref.float(), atol=2 * float(v.float().abs().max()) / 255,
                               rtol=0.01)


def _packed(k, v, bits, group_size):
    """The packed cache of keys/values (B, Hkv, T, D): whole groups of `group_size` tokens
    quantized (`mixq.reference.kv_cache`), the rest in the float residual window."""
    b, h, t, d = k.shape
    tq = t // group_size * group_size
    if tq:
        k_codes, k_scale = quantize_keys(k[:, :, :tq], bits, group_size)
        v_codes, v_scale = quantize_heads(v[:, :, :tq], bits)
        k_codes, v_codes = pack_codes(k_codes, bits), pack_codes(v_codes, bits)
    else:                                   # every token still in the residual window
        width, code_dtype = (d // 2, torch.uint8) if bits == 4 else (d, torch.int8)
        k_codes = v_codes = torch.zeros(b, h, 0, width, dtype=code_dtype, device=k.device)
        k_scale = torch.zeros(b, h, 0, d, dtype=torch.float16, device=k.device)
        v_scale = torch.zeros(b, h, 0, dtype=torch.float16, device=k.device)
    return dict(k_codes=k_codes, k_scale=k_scale, v_codes=v_codes, v_scale=v_scale,
                k_res=k[:, :, tq:].contiguous(), v_res=v[:, :, tq:].contiguous(),
                bits=bits, group_size=group_size)


def _dequantized(cache):
    return dequantize_kv(*(cache[n] for n in ("k_codes", "k_scale", "v_codes", "v_scale",
                                              "k_res", "v_res")),
                         bits=cache["bits"], group_size=cache["group_size"])


def _decode(q, cache, mask=None, **kw):
    return kv4_decode_attention(q, cache["k_codes"], cache["k_scale"], cache["v_codes"],
                                cache["v_scale"], cache["k_res"], cache["v_res"], mask,
                                bits=cache["bits"], group_size=cache["group_size"], **kw)


DECODE_CASES = [
    # b, hq, hkv, lq, lk, d, bits, group, mask, config
    (1, 4, 2, 1, 37, 16, 4, 16, None, AttentionQuantConfig(8, None, None, 8)),
    (2, 6, 3, 3, 21, 24, 8, 8, "padding", AttentionQuantConfig(None, None, None, 4)),
    (1, 3, 3, 1, 10, 64, 4, 32, None, AttentionQuantConfig(4, None, None, None)),
]


@pytest.mark.parametrize("b,hq,hkv,lq,lk,d,bits,group,mask_kind,config", DECODE_CASES)
def test_decode_matches_reference(b, hq, hkv, lq, lk, d, bits, group, mask_kind, config,
                                  device, seed):
    q, k, v = _qkv(b, hq, hkv, lq, lk, d, device)
    cache = _packed(k, v, bits, group)
    mask = _padding_mask(b, lq, lk, device) if mask_kind == "padding" else None
    got = _decode(q, cache, mask, scaling=d ** -0.5, config=config)
    k_full, v_full = _dequantized(cache)
    ref = quantized_attention_reference(q, k_full, v_full, mask, scaling=d ** -0.5, config=config)
    assert got.shape == (b, lq, hq, d)
    _check_output(got, ref, v_full, config)


def test_decode_split_k_reduction(monkeypatch, device, seed):
    """Several key splits (the flash-decoding reduction) and a residual window."""
    monkeypatch.setattr(ka, "_SPLIT_TOKENS", 64)
    q, k, v = _qkv(1, 2, 1, 2, 150, 16, device)
    cache = _packed(k, v, 4, 32)                            # 128 quantized + 22 residual
    assert cache["k_res"].shape[2] == 22
    cfg = AttentionQuantConfig(None, None, None, 8)
    got = _decode(q, cache, None, scaling=0.25, config=cfg)
    ref = quantized_attention_reference(q, *_dequantized(cache), None, scaling=0.25, config=cfg)
    _check_output(got, ref, _dequantized(cache)[1], cfg)


def test_torch_compile_traces_the_custom_ops(device, seed):
    q, k, v = _qkv(1, 2, 1, 5, 5, 16, device)
    cache = _packed(k, v, 4, 2)
    dec = AttentionQuantConfig(8, None, None, 8)
    prefill = torch.compile(lambda a, b, c: quantized_attention(a, b, c, scaling=0.25,
                                                                check_finite=False),
                            backend="aot_eager", fullgraph=True)
    decode = torch.compile(lambda a: _decode(a, cache, scaling=0.25, config=dec,
                                             check_finite=False),
                           backend="aot_eager", fullgraph=True)
    assert torch.equal(prefill(q, k, v), quantized_attention(q, k, v, scaling=0.25))
    q1 = q[:, :, :1].contiguous()
    assert torch.equal(decode(q1), _decode(q1, cache, scaling=0.25, config=dec))


def test_bad_inputs(device):
    q, k, v = _qkv(1, 2, 1, 3, 5, 16, device)
    cfg = AttentionQuantConfig()
    with pytest.raises(TypeError, match="dtype"):
        quantized_attention(q.to(torch.int32), k, v, scaling=1.0)
    with pytest.raises(ValueError, match="non-finite"):
        quantized_attention(q.clone().fill_(float("nan")), k, v, scaling=1.0)
    with pytest.raises(ValueError, match="Hkv"):
        quantized_attention(q[:, :1].repeat(1, 3, 1, 1), k.repeat(1, 2, 1, 1), v.repeat(1, 2, 1, 1),
                            scaling=1.0)
    with pytest.raises(ValueError, match="attention_mask"):
        quantized_attention(q, k, v, torch.zeros(1, 1, 3, 4, device=device), scaling=1.0)
    with pytest.raises(ValueError, match="scaling"):
        quantized_attention(q, k, v, scaling=-1.0)
    with pytest.raises(TypeError, match="config"):
        quantized_attention(q, k, v, scaling=1.0, config={"q_bits": 8})
    cache = _packed(k, v, 4, 2)
    with pytest.raises(ValueError, match="k_bits"):
        _decode(q, cache, scaling=1.0, config=cfg)
    dec = dataclasses.replace(cfg, k_bits=None, v_bits=None)
    with pytest.raises(ValueError, match="new tokens"):
        _decode(torch.randn(1, 2, 17, 16, device=device), cache, scaling=1.0, config=dec)
    with pytest.raises(TypeError, match="k_codes must be a torch.Tensor"):
        kv4_decode_attention(q, (k, v), *range(5), bits=4, group_size=2, scaling=1.0, config=dec)
    with pytest.raises(TypeError, match="k_codes.*dtype"):          # int8 codes with bits=4
        _decode(q, {**cache, "k_codes": cache["k_codes"].to(torch.int8)}, scaling=1.0, config=dec)
    with pytest.raises(ValueError, match="bits"):
        _decode(q, {**cache, "bits": 3}, scaling=1.0, config=dec)
    with pytest.raises(ValueError, match="k_scale must have shape"):      # another group size
        _decode(q, {**cache, "group_size": 1}, scaling=1.0, config=dec)
    with pytest.raises(ValueError, match="fewer than"):
        _decode(q, _packed(k[:, :, :2], v[:, :, :2], 4, 2), scaling=1.0, config=dec)
    with pytest.raises(ValueError, match="does not fit"):
        _decode(torch.randn(1, 2, 3, 8, device=device), cache, scaling=1.0, config=dec)


def test_cpu_tensor_rejected_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 1, 2, 16)
    with pytest.raises(ValueError, match="CUDA"):
        quantized_attention(q, q, q, scaling=1.0)
