"""Triton kernels: quantized attention for prefill (flash-style) and decode over a packed KV4 cache.

Both compute exactly the math of `mixq.reference.attention` (read its module docstring first)::

    S = Q K^T * scaling + mask  ->  m = rowmax(S)  ->  P_c = round(exp(S - m) * pmax)
    O = (P_c @ V_dq) / sum(P_c)

with P codes defined from the *global* row max. A one-pass online softmax would quantize
``exp(S - running_max)``, whose codes depend on the key tiling; so each kernel runs two passes
over the keys: pass 1 finds the row max (exact, any order), pass 2 recomputes the scores, forms
the codes and accumulates ``P_c @ V`` and ``l = sum P_c``. QK^T is computed twice (the price of
tiling-independent codes); V is read once.

Prefill (`quantized_attention`): one program per (BLOCK_M queries, batch x query head).
Q and K are quantized per token by `mixq.kernels.act_quant` (bit-identical to the reference);
with both quantized, ``tl.dot(int8, int8) -> int32`` is exact and the scales are applied after,
in the reference's order ``acc * (q_s * scaling) * k_s``, so S, and therefore the row max m,
match the reference bit for bit. With P and V quantized, ``P_c @ V_dq`` is a ``tl.dot`` of
fp16 tiles: the codes 0..255 are exact in fp16, V_dq is fp16 by definition, each product
(8 x 11 significant bits) is exact in the fp32 accumulator, so the only difference from the
reference is the fp32 summation order. Otherwise the dots run in fp32 (``input_precision="ieee"``).

Decode (`kv4_decode_attention`): for Lq <= 16 new tokens, reading a packed KV cache
(the tensors of `mixq.reference.kv_cache`, as `mixq.hf.kv_cache.KV4Layer` holds them):
K codes (int4 packed two per byte along D, or int8) with one fp16 scale per (group of G tokens,
channel), V codes with one fp16 scale per token, and the fp residual window of the newest
tokens. Flash-decoding: grid (batch x KV head, key splits); one program holds the
``n_rep * Lq`` query rows of all query heads that share its KV head (GQA: the cache is read
once per KV head), dequantizes K (``code * scale``, fp32) and V (``fp16(code * scale)``) in
registers and writes per-split partials; the splits are reduced with torch (max for m, sums
for l and the accumulator).

Where the kernels can differ from the reference: ``exp`` may differ by an ulp between Triton and
torch, which moves a P code across a rounding boundary in rare cases (one code by +-1 changes O
by at most ``max|V_dq| / l <= max|V_dq| / pmax``); and fp32 summation order (about 1e-6
relative). Tests bound the former with a tolerance of ``2 max|V_dq| / pmax`` and check that the
mean error stays at fp32-rounding level.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mixq.config import AttentionQuantConfig
from mixq.reference.attention import (check_attention_config, check_attention_inputs,
                                      check_scaling, dequantize_rows, dequantize_v, prepare_mask,
                                      quantized_attention_reference)
from mixq.reference.kv_cache import KV_BITS, dequantize_kv
from mixq.kernels._triton import (autotune, check_kernel_device, fallback_to_reference,
                                  m_bucket, op_name)
from mixq.kernels.act_quant import act_quant
from mixq.kernels.pack import round_half_even

__all__ = ["quantized_attention", "kv4_decode_attention", "DECODE_MAX_LQ"]

DECODE_MAX_LQ = 16
_SPLIT_TOKENS = 256          # keys per decode split (a multiple of every decode BLOCK_N)
_MAX_SPLITS = 64

_PREFILL_CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=3),
]
_DECODE_CONFIGS = [
    triton.Config({"BLOCK_N": 32}, num_warps=4),
    triton.Config({"BLOCK_N": 64}, num_warps=4),
    triton.Config({"BLOCK_N": 64}, num_warps=8),
]


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _mask_strides(mask: torch.Tensor | None) -> tuple[int, int, int, int]:
    """Element strides of a (Bm, Hm, Lq, Lk) mask with 0 on broadcast (size-1) dims."""
    if mask is None:
        return 0, 0, 0, 0
    return tuple(0 if mask.shape[i] == 1 else mask.stride(i) for i in range(4))


# ---------------------------------------------------------------------------------- prefill
@triton.jit
def _probabilities(s, m_i, QUANT_P: tl.constexpr, PMAX: tl.constexpr):
    """exp(S - m) with the global row max m; the P codes round(exp(S - m) * PMAX) if QUANT_P."""
    p = tl.exp(s - m_i[:, None])
    if QUANT_P:
        p = round_half_even(p * PMAX)
    return p


@triton.jit
def _prefill_scores(q, qs, k_ptr, ks_ptr, mask_ptr, kv_row0, b, h, rows, rmask, n0, d, dmask,
                    Lq, Lk, D, scaling, s_mb, s_mh, s_mq, s_mk,
                    INT_QK: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    """Masked scores (BM, BN) fp32 of the key tile n0..n0+BN; -inf outside the keys."""
    cols = n0 + tl.arange(0, BLOCK_N)
    cmask = cols < Lk
    k = tl.load(k_ptr + (kv_row0 + cols)[:, None] * D + d[None, :],
                mask=cmask[:, None] & dmask[None, :], other=0)
    if INT_QK:
        acc = tl.dot(q, tl.trans(k), out_dtype=tl.int32)
        ks = tl.load(ks_ptr + kv_row0 + cols, mask=cmask, other=1.0).to(tl.float32)
        s = acc.to(tl.float32) * qs[:, None] * ks[None, :]
    else:
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scaling
    if HAS_MASK:
        s += tl.load(mask_ptr + b * s_mb + h * s_mh + rows[:, None] * s_mq + cols[None, :] * s_mk,
                     mask=rmask[:, None] & cmask[None, :], other=0.0)
    keep = cmask[None, :]
    if CAUSAL:
        keep = keep & (cols[None, :] <= rows[:, None] + (Lk - Lq))
    return tl.where(keep, s, float("-inf"))


@autotune(_PREFILL_CONFIGS, key=["LQ_BUCKET", "LK_BUCKET", "BLOCK_D", "INT_QK", "PV_FP16"])
@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, qs_ptr, ks_ptr, mask_ptr, o_ptr, m_ptr, l_ptr,
                    Lq, Lk, D, HQ, HKV, N_REP, scaling, s_mb, s_mh, s_mq, s_mk,
                    LQ_BUCKET, LK_BUCKET,
                    INT_QK: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr,
                    QUANT_P: tl.constexpr, PMAX: tl.constexpr, PV_FP16: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)                       # b * HQ + h
    b = pid_bh // HQ
    h = pid_bh % HQ
    kv_row0 = (b * HKV + h // N_REP) * Lk           # first key row of this (b, kv head)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < Lq
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    q = tl.load(q_ptr + (pid_bh * Lq + rows)[:, None] * D + d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0)
    qs = tl.full((BLOCK_M,), 1.0, tl.float32)
    if INT_QK:
        qs = tl.load(qs_ptr + pid_bh * Lq + rows, mask=rmask, other=1.0).to(tl.float32) * scaling
    hi = Lk
    if CAUSAL:                                      # key tiles past the diagonal are all -inf
        hi = tl.minimum(Lk, (pid_m + 1) * BLOCK_M + (Lk - Lq))
    # pass 1: the exact row max
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    for n0 in range(0, hi, BLOCK_N):
        s = _prefill_scores(q, qs, k_ptr, ks_ptr, mask_ptr, kv_row0, b, h, rows, rmask, n0, d,
                            dmask, Lq, Lk, D, scaling, s_mb, s_mh, s_mq, s_mk,
                            INT_QK, HAS_MASK, CAUSAL, BLOCK_N)
        m_i = tl.maximum(m_i, tl.max(s, axis=1))
    m_i = tl.where(m_i == float("-inf"), 0.0, m_i)
    # pass 2: P codes, their sum and P @ V
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for n0 in range(0, hi, BLOCK_N):
        s = _prefill_scores(q, qs, k_ptr, ks_ptr, mask_ptr, kv_row0, b, h, rows, rmask, n0, d,
                            dmask, Lq, Lk, D, scaling, s_mb, s_mh, s_mq, s_mk,
                            INT_QK, HAS_MASK, CAUSAL, BLOCK_N)
        p = _probabilities(s, m_i, QUANT_P, PMAX)
        l_i += tl.sum(p, axis=1)
        cols = n0 + tl.arange(0, BLOCK_N)
        v = tl.load(v_ptr + (kv_row0 + cols)[:, None] * D + d[None, :],
                    mask=(cols < Lk)[:, None] & dmask[None, :], other=0)
        if PV_FP16:
            acc = tl.dot(p.to(tl.float16), v.to(tl.float16), acc)
        else:
            acc = tl.dot(p, v.to(tl.float32), acc, input_precision="ieee")
    out = tl.where(l_i[:, None] > 0, acc / l_i[:, None], 0.0)
    # output in HF's (B, Lq, Hq, D) layout
    tl.store(o_ptr + ((b * Lq + rows)[:, None] * HQ + h) * D + d[None, :], out,
             mask=rmask[:, None] & dmask[None, :])
    tl.store(m_ptr + pid_bh * Lq + rows, m_i, mask=rmask)
    tl.store(l_ptr + pid_bh * Lq + rows, l_i, mask=rmask)


def _prefill_impl(q, k, v, q_scale, k_scale, mask, scaling: float, is_causal: bool,
                  p_bits: int, pv_fp16: bool):
    bsz, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    int_qk = q.dtype == torch.int8
    out = torch.empty((bsz, lq, hq, d), dtype=torch.float32, device=q.device)
    row_max = torch.empty((bsz, hq, lq), dtype=torch.float32, device=q.device)
    row_sum = torch.empty_like(row_max)
    has_mask = mask.numel() > 0
    s_mb, s_mh, s_mq, s_mk = _mask_strides(mask if has_mask else None)
    block_d = max(_next_pow2(d), 32 if int_qk else 16)
    grid = lambda meta: (triton.cdiv(lq, meta["BLOCK_M"]), bsz * hq)   # noqa: E731
    _prefill_kernel[grid](
        q, k, v, q_scale, k_scale, mask, out, row_max, row_sum,
        lq, lk, d, hq, hkv, hq // hkv, float(scaling), s_mb, s_mh, s_mq, s_mk,
        m_bucket(lq), m_bucket(lk),
        INT_QK=int_qk, HAS_MASK=has_mask, CAUSAL=is_causal and not has_mask and lq > 1,
        QUANT_P=p_bits > 0, PMAX=float(2 ** p_bits - 1) if p_bits > 0 else 1.0,
        PV_FP16=pv_fp16, BLOCK_D=block_d)
    return out, row_max, row_sum


@torch.library.custom_op(op_name("attention_prefill"), mutates_args=())
def _prefill_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_scale: torch.Tensor,
                k_scale: torch.Tensor, mask: torch.Tensor, scaling: float, is_causal: bool,
                p_bits: int, pv_fp16: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _prefill_impl(q, k, v, q_scale, k_scale, mask, scaling, is_causal, p_bits, pv_fp16)


@_prefill_op.register_fake
def _(q, k, v, q_scale, k_scale, mask, scaling, is_causal, p_bits, pv_fp16):
    bsz, hq, lq, d = q.shape
    stats = q.new_empty((bsz, hq, lq), dtype=torch.float32)
    return q.new_empty((bsz, lq, hq, d), dtype=torch.float32), stats, stats.clone()


def _quantize_rows(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """act_quant per (b, h, token) row: codes int8 (B, H, L, D), scale fp16 (B, H, L)."""
    b, h, n, d = x.shape
    codes, scale, _ = act_quant(x.reshape(-1, d).contiguous(), out_format="int8", bits=bits)
    return codes.reshape(b, h, n, d), scale.reshape(b, h, n)


def _kernel_mask(attention_mask, bsz, lq, lk, is_causal, device, check_nan):
    """(fp32 mask, possibly a broadcast view, or an empty tensor; whether causal is still needed)."""
    if attention_mask is None:
        return torch.empty(0, device=device), is_causal
    return prepare_mask(attention_mask, bsz, lq, lk, is_causal, device, check_nan=check_nan), False


def quantized_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None = None, *, scaling: float,
                        config: AttentionQuantConfig | None = None, is_causal: bool = True,
                        return_stats: bool = False, check_finite: bool = True):
    """Prefill quantized attention with the Triton kernel (same contract as
    `mixq.reference.attention.quantized_attention_reference`).

    Args:
        query: (B, Hq, Lq, D) fp16/bf16/fp32, CUDA (or CPU under TRITON_INTERPRET=1), finite.
        key, value: (B, Hkv, Lk, D), Hkv | Hq, same device.
        attention_mask: additive float / bool mask broadcastable to (B, 1, Lq, Lk), or None.
        scaling: positive float. config: bit widths. is_causal: causal when no mask (Lq > 1).
        return_stats: also return the fp32 (B, Hq, Lq) row max m of S and the sum l of the
            (quantized) probabilities, for tests.
        check_finite: reject NaN/Inf in query/key/value/mask (a device sync each; the HF
            integration turns it off: NaN/Inf then give unspecified output).
    Returns:
        (B, Lq, Hq, D) in query.dtype; with `return_stats`, ``(out, m, l)``.
    """
    check_attention_inputs(query, key, value, finite=check_finite)
    check_kernel_device(query, "query")
    config = check_attention_config(config)
    scaling = check_scaling(scaling)
    if fallback_to_reference(query, "attention_prefill"):
        if return_stats:
            raise ValueError("return_stats needs the kernel (this GPU falls back to the reference)")
        return quantized_attention_reference(query, key, value, attention_mask, scaling=scaling,
                                             config=config, is_causal=is_causal)
    bsz, _, lq, _ = query.shape
    mask, causal = _kernel_mask(attention_mask, bsz, lq, key.shape[2], is_causal, query.device,
                                check_finite)
    empty = torch.empty(0, device=query.device)
    if config.int_qk:
        q, q_scale = _quantize_rows(query, config.q_bits)
        k, k_scale = _quantize_rows(key, config.k_bits)
    else:
        q = dequantize_rows(*_quantize_rows(query, config.q_bits)) if config.q_bits else query.float()
        k = dequantize_rows(*_quantize_rows(key, config.k_bits)) if config.k_bits else key.float()
        q_scale = k_scale = empty
    v = dequantize_v(*_quantize_rows(value, config.v_bits)) if config.v_bits else value.float()
    pv_fp16 = config.v_bits is not None and config.p_bits is not None
    impl = _prefill_op if torch.compiler.is_compiling() else _prefill_impl
    out, row_max, row_sum = impl(q.contiguous(), k.contiguous(), v.contiguous(), q_scale,
                                 k_scale, mask, scaling, causal, config.p_bits or 0, pv_fp16)
    out = out.to(query.dtype)
    return (out, row_max, row_sum) if return_stats else out


# ---------------------------------------------------------------------------------- decode
@triton.jit
def _load_codes(ptr, tok_rows, d, mask, D, BITS: tl.constexpr):
    """Signed codes (BN, BD) int32 of cached tokens `tok_rows` (row index into (B*Hkv*Tq, .)):
    bits=4 reads byte d // 2 and takes nibble d % 2 (low first, two's complement); 8: int8."""
    if BITS == 4:
        byte = tl.load(ptr + tok_rows[:, None] * (D // 2) + (d // 2)[None, :], mask=mask,
                       other=0).to(tl.int32)
        nib = (byte >> ((d & 1) * 4)[None, :]) & 0xF
        code = tl.where(nib >= 8, nib - 16, nib)
    else:
        code = tl.load(ptr + tok_rows[:, None] * D + d[None, :], mask=mask, other=0).to(tl.int32)
    return code


@triton.jit
def _decode_scores(q, kq_ptr, ksc_ptr, kr_ptr, mask_ptr, bh, b, head, qi, rmask, n0, end, d,
                   dmask, Lq, TQ, R, D, G, scaling, s_mb, s_mh, s_mq, s_mk,
                   BITS: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """Masked scores (BM, BN) fp32 against cached keys n0..n0+BN (dequantized in registers)."""
    cols = n0 + tl.arange(0, BLOCK_N)
    in_q = cols < TQ
    in_r = (cols >= TQ) & (cols < end)
    m_q = in_q[:, None] & dmask[None, :]
    code = _load_codes(kq_ptr, bh * TQ + cols, d, m_q, D, BITS)
    ksc = tl.load(ksc_ptr + (bh * (TQ // G) + cols // G)[:, None] * D + d[None, :], mask=m_q,
                  other=0.0).to(tl.float32)
    kres = tl.load(kr_ptr + (bh * R + (cols - TQ))[:, None] * D + d[None, :],
                   mask=in_r[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    k = tl.where(in_q[:, None], code.to(tl.float32) * ksc, kres)
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * scaling
    lk = TQ + R
    if HAS_MASK:
        s += tl.load(mask_ptr + b * s_mb + head[:, None] * s_mh + qi[:, None] * s_mq
                     + cols[None, :] * s_mk, mask=rmask[:, None] & (cols < end)[None, :], other=0.0)
    keep = (cols < end)[None, :]
    if CAUSAL:
        keep = keep & (cols[None, :] <= qi[:, None] + (lk - Lq))
    return tl.where(keep, s, float("-inf"))


@autotune(_DECODE_CONFIGS, key=["ROWS", "LK_BUCKET", "BLOCK_D", "BITS", "PASS"])
@triton.jit
def _decode_kernel(q_ptr, kq_ptr, ksc_ptr, vq_ptr, vsc_ptr, kr_ptr, vr_ptr, mask_ptr,
                   mglob_ptr, mpart_ptr, lpart_ptr, acc_ptr,
                   Lq, TQ, R, D, HQ, HKV, N_REP, G, CHUNK, scaling, s_mb, s_mh, s_mq, s_mk,
                   ROWS, LK_BUCKET,
                   BITS: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr,
                   QUANT_P: tl.constexpr, PMAX: tl.constexpr, PASS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    bh = tl.program_id(0)                           # b * HKV + kv head
    split = tl.program_id(1)
    n_split = tl.num_programs(1)
    b = bh // HKV
    r = tl.arange(0, BLOCK_M)                       # row r = (j, qi): query head hkv*N_REP + j
    rmask = r < N_REP * Lq
    head = (bh % HKV) * N_REP + r // Lq
    qi = r % Lq
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    q = tl.load(q_ptr + ((b * HQ + head) * Lq + qi)[:, None] * D + d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, TQ + R)
    part = (bh * n_split + split) * BLOCK_M + r
    if PASS == 1:
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        for n0 in range(start, end, BLOCK_N):
            s = _decode_scores(q, kq_ptr, ksc_ptr, kr_ptr, mask_ptr, bh, b, head, qi, rmask, n0,
                               end, d, dmask, Lq, TQ, R, D, G, scaling, s_mb, s_mh, s_mq, s_mk,
                               BITS, HAS_MASK, CAUSAL, BLOCK_N)
            m_i = tl.maximum(m_i, tl.max(s, axis=1))
        tl.store(mpart_ptr + part, m_i)
    else:
        m_i = tl.load(mglob_ptr + bh * BLOCK_M + r)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        for n0 in range(start, end, BLOCK_N):
            s = _decode_scores(q, kq_ptr, ksc_ptr, kr_ptr, mask_ptr, bh, b, head, qi, rmask, n0,
                               end, d, dmask, Lq, TQ, R, D, G, scaling, s_mb, s_mh, s_mq, s_mk,
                               BITS, HAS_MASK, CAUSAL, BLOCK_N)
            p = _probabilities(s, m_i, QUANT_P, PMAX)
            l_i += tl.sum(p, axis=1)
            cols = n0 + tl.arange(0, BLOCK_N)
            in_q = cols < TQ
            code = _load_codes(vq_ptr, bh * TQ + cols, d, in_q[:, None] & dmask[None, :], D, BITS)
            vsc = tl.load(vsc_ptr + bh * TQ + cols, mask=in_q, other=0.0).to(tl.float32)
            vdq = (code.to(tl.float32) * vsc[:, None]).to(tl.float16).to(tl.float32)
            vres = tl.load(vr_ptr + (bh * R + (cols - TQ))[:, None] * D + d[None, :],
                           mask=((cols >= TQ) & (cols < end))[:, None] & dmask[None, :],
                           other=0.0).to(tl.float32)
            v = tl.where(in_q[:, None], vdq, vres)
            acc = tl.dot(p, v, acc, input_precision="ieee")
        tl.store(lpart_ptr + part, l_i)
        tl.store(acc_ptr + part[:, None] * BLOCK_D + d[None, :], acc)


def _decode_impl(q, k_codes, k_scale, v_codes, v_scale, k_res, v_res, mask, group_size: int,
                 bits: int, scaling: float, is_causal: bool, p_bits: int) -> torch.Tensor:
    bsz, hq, lq, d = q.shape
    hkv, tq = k_codes.shape[1], k_codes.shape[2]
    r_len = k_res.shape[2]
    lk = tq + r_len
    n_rep = hq // hkv
    block_m = max(16, _next_pow2(n_rep * lq))
    block_d = max(16, _next_pow2(d))
    n_split = max(1, min(_MAX_SPLITS, triton.cdiv(lk, _SPLIT_TOKENS)))
    chunk = triton.cdiv(triton.cdiv(lk, n_split), 64) * 64
    n_split = triton.cdiv(lk, chunk)
    has_mask = mask.numel() > 0
    s_mb, s_mh, s_mq, s_mk = _mask_strides(mask if has_mask else None)
    dev = q.device
    m_part = torch.empty((bsz * hkv, n_split, block_m), dtype=torch.float32, device=dev)
    l_part = torch.empty_like(m_part)
    acc = torch.empty((bsz * hkv, n_split, block_m, block_d), dtype=torch.float32, device=dev)
    common = dict(BITS=bits, HAS_MASK=has_mask, CAUSAL=is_causal and not has_mask and lq > 1,
                  QUANT_P=p_bits > 0, PMAX=float(2 ** p_bits - 1) if p_bits > 0 else 1.0,
                  BLOCK_M=block_m, BLOCK_D=block_d)
    args = [q, k_codes, k_scale, v_codes, v_scale, k_res, v_res, mask]
    sizes = [lq, tq, r_len, d, hq, hkv, n_rep, group_size, chunk, float(scaling),
             s_mb, s_mh, s_mq, s_mk, n_rep * lq, m_bucket(lk)]
    grid = (bsz * hkv, n_split)
    _decode_kernel[grid](*args, m_part, m_part, l_part, acc, *sizes, PASS=1, **common)
    m_glob = m_part.amax(dim=1)
    m_glob = torch.where(torch.isneginf(m_glob), torch.zeros_like(m_glob), m_glob).contiguous()
    _decode_kernel[grid](*args, m_glob, m_part, l_part, acc, *sizes, PASS=2, **common)
    l_sum = l_part.sum(dim=1)[..., None]
    out = acc.sum(dim=1)
    out = torch.where(l_sum > 0, out / l_sum, torch.zeros_like(out))[:, :n_rep * lq, :d]
    # rows (b, hkv, j, qi) -> (B, Lq, Hq = hkv * n_rep + j, D)
    return out.reshape(bsz, hkv, n_rep, lq, d).permute(0, 3, 1, 2, 4).reshape(bsz, lq, hq, d)


@torch.library.custom_op(op_name("attention_kv4_decode"), mutates_args=())
def _decode_op(q: torch.Tensor, k_codes: torch.Tensor, k_scale: torch.Tensor,
               v_codes: torch.Tensor, v_scale: torch.Tensor, k_res: torch.Tensor,
               v_res: torch.Tensor, mask: torch.Tensor, group_size: int, bits: int,
               scaling: float, is_causal: bool, p_bits: int) -> torch.Tensor:
    return _decode_impl(q, k_codes, k_scale, v_codes, v_scale, k_res, v_res, mask, group_size,
                        bits, scaling, is_causal, p_bits)


@_decode_op.register_fake
def _(q, k_codes, k_scale, v_codes, v_scale, k_res, v_res, mask, group_size, bits, scaling,
      is_causal, p_bits):
    bsz, hq, lq, d = q.shape
    return q.new_empty((bsz, lq, hq, d), dtype=torch.float32)


def kv4_decode_attention(query: torch.Tensor, k_codes: torch.Tensor, k_scale: torch.Tensor,
                         v_codes: torch.Tensor, v_scale: torch.Tensor, k_res: torch.Tensor,
                         v_res: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                         bits: int, group_size: int, scaling: float,
                         config: AttentionQuantConfig | None = None, is_causal: bool = True,
                         check_finite: bool = True) -> torch.Tensor:
    """Decode attention of Lq <= 16 new queries over a packed KV cache (plain tensors).

    Same result as ``quantized_attention_reference(query, *dequantize_kv(...), attention_mask,
    scaling=..., config=replace(config, k_bits=None, v_bits=None))`` to the tolerance in the
    module docstring; the cache is read packed, never dequantized to memory.

    Args:
        query: (B, Hq, Lq, D) fp16/bf16/fp32, 1 <= Lq <= 16, finite; CUDA (or CPU under
            TRITON_INTERPRET=1).
        k_codes, v_codes: (B, Hkv, Tq, D/2) uint8 (bits 4) or (B, Hkv, Tq, D) int8 (bits 8);
            Hkv | Hq.
        k_scale: fp16 (B, Hkv, Tq/G, D); v_scale: fp16 (B, Hkv, Tq).
        k_res, v_res: the float residual window (B, Hkv, T - Tq, D); Lk = T >= Lq tokens in
            all, the new ones included (the layout of `mixq.reference.kv_cache`).
        attention_mask: additive / bool mask broadcastable to (B, 1, Lq, Lk), or None.
        bits: 4 or 8. group_size: G, tokens per key scale.
        scaling: positive float. config: q_bits and p_bits are used; k/v bits must be None
            (the cache's quantization applies). is_causal: causal when no mask (Lq > 1).
        check_finite: reject NaN/Inf in query/mask (a device sync; off in the HF integration).
    Returns:
        (B, Lq, Hq, D) in query.dtype.
    """
    from mixq.validation import check_tensor

    check_tensor(query, "query", ndim=4, dtypes=(torch.float16, torch.bfloat16, torch.float32),
                 finite=check_finite)
    check_kernel_device(query, "query")
    config = check_attention_config(config)
    scaling = check_scaling(scaling)
    if config.k_bits is not None or config.v_bits is not None:
        raise ValueError("kv4_decode_attention reads K/V quantized by the cache: pass a config "
                         f"with k_bits=None and v_bits=None, got k_bits={config.k_bits}, "
                         f"v_bits={config.v_bits}")
    if isinstance(bits, bool) or bits not in KV_BITS:
        raise ValueError(f"bits must be one of {KV_BITS}, got {bits!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    bsz, hq, lq, d = query.shape
    if not 1 <= lq <= DECODE_MAX_LQ:
        raise ValueError(f"decode handles 1..{DECODE_MAX_LQ} new tokens, got Lq={lq} "
                         f"(query shape {tuple(query.shape)}); use quantized_attention")
    _check_packed_cache(query, k_codes, k_scale, v_codes, v_scale, k_res, v_res, bits,
                        group_size)
    lk = k_codes.shape[2] + k_res.shape[2]
    if lk < lq:
        raise ValueError(f"the cache holds {lk} tokens, fewer than the Lq={lq} new queries")
    if fallback_to_reference(query, "attention_kv4_decode"):
        k_full, v_full = dequantize_kv(k_codes, k_scale, v_codes, v_scale, k_res, v_res,
                                       bits=bits, group_size=group_size)
        return quantized_attention_reference(query, k_full, v_full, attention_mask,
                                             scaling=scaling, config=config, is_causal=is_causal)
    mask, causal = _kernel_mask(attention_mask, bsz, lq, lk, is_causal, query.device, check_finite)
    if config.q_bits is not None:
        q = dequantize_rows(*_quantize_rows(query, config.q_bits))
    else:
        q = query.float()
    impl = _decode_op if torch.compiler.is_compiling() else _decode_impl
    out = impl(q.contiguous(), k_codes.contiguous(), k_scale.contiguous(), v_codes.contiguous(),
               v_scale.contiguous(), k_res.contiguous(), v_res.contiguous(), mask, group_size,
               bits, scaling, causal, config.p_bits or 0)
    return out.to(query.dtype)


def _check_packed_cache(query, k_codes, k_scale, v_codes, v_scale, k_res, v_res, bits: int,
                        group_size: int) -> None:
    """Shapes, dtypes and devices of the packed cache against the query (ValueError/TypeError
    naming the tensor)."""
    from mixq.validation import check_tensor

    bsz, hq, _, d = query.shape
    code_dtype, width = (torch.uint8, d // 2) if bits == 4 else (torch.int8, d)
    for name, t in (("k_codes", k_codes), ("v_codes", v_codes)):
        check_tensor(t, name, ndim=4, dtypes=(code_dtype,), nonempty=False)
    for name, t in (("k_scale", k_scale), ("v_scale", v_scale)):
        check_tensor(t, name, dtypes=(torch.float16,), nonempty=False)
    for name, t in (("k_res", k_res), ("v_res", v_res)):
        check_tensor(t, name, ndim=4, dtypes=(torch.float16, torch.bfloat16, torch.float32),
                     nonempty=False)
    b, hkv, tq, w = k_codes.shape
    if b != bsz or hq % hkv != 0 or w != width or (bits == 4 and d % 2):
        raise ValueError(f"cache (B, Hkv, ., D) = ({b}, {hkv}, ., {2 * w if bits == 4 else w}) "
                         f"does not fit query {tuple(query.shape)}")
    want = {"v_codes": (b, hkv, tq, w), "k_scale": (b, hkv, tq // group_size, d),
            "v_scale": (b, hkv, tq), "k_res": (b, hkv, k_res.shape[2], d),
            "v_res": (b, hkv, k_res.shape[2], d)}
    got = {"v_codes": v_codes, "k_scale": k_scale, "v_scale": v_scale, "k_res": k_res,
           "v_res": v_res}
    for name, shape in want.items():
        if tuple(got[name].shape) != shape:
            raise ValueError(f"{name} must have shape {shape} for k_codes "
                             f"{tuple(k_codes.shape)} and group_size {group_size}, "
                             f"got {tuple(got[name].shape)}")
    if tq % group_size:
        raise ValueError(f"k_codes holds {tq} tokens, not a whole number of groups of "
                         f"{group_size}")
    for name, t in (("k_codes", k_codes), *got.items()):
        if t.device != query.device:
            raise ValueError(f"the cache ({name}) is on {t.device} but query is on {query.device}")
