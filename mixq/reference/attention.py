"""Quantized attention, the pure-PyTorch reference (the ground truth of `mixq.kernels.attention`).

Shapes follow HF eager attention: ``query (B, Hq, Lq, D)``, ``key / value (B, Hkv, Lk, D)`` with
``Hq = n_rep * Hkv`` (grouped-query attention: query head h reads key/value head ``h // n_rep``,
the `repeat_kv` rule), an additive float ``attention_mask`` broadcastable to ``(B, 1, Lq, Lk)``
(0 = attend, a very negative number = masked; a bool mask with True = attend is accepted too),
and the output is returned as HF attention functions return it: ``(B, Lq, Hq, D)``.

The math, in the order the kernels of `mixq.kernels.attention` do it (all float math in fp32)::

    Q, K, V (if their bits are set): symmetric per (b, head, token) row of D, fp16 scales,
        x_c, x_s = quantize_per_token(x, bits)            # codes int8, scale fp16   [rounding 1]
    S = (Q_c @ K_c^T).int32 * (fp32(q_s) * scaling) * fp32(k_s)^T     if Q and K are quantized
        (the integer product is exact; then two fp32 multiplies, in this order)   [rounding 2]
      = (Q_dq @ K_dq^T) * scaling                                       otherwise (fp32 GEMM)
    S = S + mask            (no mask and is_causal: -inf above the bottom-right diagonal)
    m = rowmax(S)                                       (exact, order-free)
    E = exp(S - m)          in (0, 1], the row max maps to exactly 1
    P_c = round(E * pmax)   pmax = 255 (p_bits 8) or 15 (p_bits 4), unsigned     [rounding 3]
        (p_bits None: P_c = E, no rounding)
    l = sum_j P_c[:, j]     an exact integer sum when P is quantized
    V_dq = fp16(v_c * fp32(v_s))  if V is quantized (fp32 product rounded to fp16) [rounding 4]
         = fp32(V)               otherwise
    O = (P_c @ V_dq) / l    fp32, then cast to query.dtype                           [rounding 5]

Why P codes come from ``exp(S - rowmax)`` and not from the normalized softmax: the row max is
exact however the keys are tiled, so a flash-style kernel (pass 1: row max; pass 2: codes and
P @ V) computes the very same codes block by block; the largest probability always gets the
full code pmax (quantizing the normalized P with the fixed scale 1/255 would flush to 0 most of
the mass of a long row); and the normalizer is the exact integer sum of the codes, so the
dequantized weights ``P_c / l`` sum to exactly 1. The scale of P is the fixed ``1 / pmax``.

With every bit width None this is softmax attention in fp32; for an fp32 model it equals HF's
`eager_attention_forward` up to fp32 rounding (tests/test_attention.py checks it).

The bit widths come from `mixq.config.AttentionQuantConfig`; the Hugging Face integration that
routes a model's attention here is `mixq.hf.attention`.
"""
from __future__ import annotations

import torch

from mixq.config import AttentionQuantConfig
from mixq.reference.linear import quantize_per_token
from mixq.validation import check_tensor, value_checks

__all__ = ["quantized_attention_reference", "attention_scores", "softmax_pv", "quantize_heads",
           "dequantize_v", "dequantize_rows", "prepare_mask", "check_attention_inputs",
           "check_attention_config", "check_scaling"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


# ------------------------------------------------------------------------------- the pieces
def quantize_heads(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row quantization of (B, H, L, D) activations: one fp16 scale per (b, h, l).

    Returns ``(codes int8 (B, H, L, D), scale fp16 (B, H, L))`` with the rounding of
    `mixq.reference.quantize_per_token` (scale = fp16(absmax / qmax), 0 -> 1; codes RNE).
    """
    b, h, n, d = x.shape
    codes, scale = quantize_per_token(x.reshape(-1, d), bits)
    return codes.reshape(b, h, n, d), scale.reshape(b, h, n)


def dequantize_v(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """V_dq = fp16(codes * fp32(scale)): codes int8 (..., L, D), scale (..., L) -> fp16 (..., L, D)."""
    return dequantize_rows(codes, scale).to(torch.float16)


def dequantize_rows(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale.float().unsqueeze(-1)


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def prepare_mask(attention_mask: torch.Tensor | None, batch: int, lq: int, lk: int,
                 is_causal: bool, device: torch.device, *,
                 check_nan: bool = True) -> torch.Tensor | None:
    """The additive fp32 mask (Bm, Hm, Lq, Lk) the math uses, or None (no mask at all).

    * a float mask is cast to fp32 and sliced to its first Lk columns ``[..., :Lk]`` (HF
      slices the same way); a bool mask (True = attend) becomes 0 / finfo(fp32).min;
    * None with `is_causal` and ``Lq > 1``: -inf above the bottom-right aligned diagonal, i.e.
      query i (absolute position ``Lk - Lq + i``) sees keys ``j <= Lk - Lq + i``.

    A NaN in a float mask is a ValueError (`check_nan`; a device sync, skipped on hot paths).
    """
    if attention_mask is None:
        if not is_causal or lq == 1:
            return None
        i = torch.arange(lq, device=device)[:, None] + (lk - lq)
        j = torch.arange(lk, device=device)[None, :]
        zero = torch.zeros((), device=device)
        return torch.where(j <= i, zero, float("-inf"))[None, None]
    check_tensor(attention_mask, "attention_mask", ndim=4,
                 dtypes=(torch.bool, torch.float16, torch.bfloat16, torch.float32, torch.float64))
    if attention_mask.device != device:
        raise ValueError(f"attention_mask is on {attention_mask.device} but query is on {device}")
    mb, mh, mq, mk = attention_mask.shape
    if mb not in (1, batch) or mq != lq or mk < lk:
        raise ValueError(f"attention_mask must broadcast to (B, 1, Lq, Lk) = ({batch}, 1, {lq}, {lk}), "
                         f"got shape {tuple(attention_mask.shape)}")
    mask = attention_mask[..., :lk]
    if mask.dtype == torch.bool:
        return torch.where(mask, 0.0, torch.finfo(torch.float32).min).float()
    mask = mask.float()
    if check_nan and value_checks() and bool(torch.isnan(mask).any()):
        raise ValueError("attention_mask has NaN values")
    return mask


def attention_scores(query: torch.Tensor, key: torch.Tensor, *, scaling: float,
                     q_bits: int | None, k_bits: int | None) -> torch.Tensor:
    """S before the mask, fp32 (B, Hq, Lq, Lk); key (B, Hkv, Lk, D) is shared by n_rep heads.

    Both quantized: ``(Q_c @ K_c^T) * (fp32(q_s) * scaling) * fp32(k_s)^T`` with the integer
    product exact (float64 GEMM of int8 codes, exact below 2^53, then int -> fp32);
    otherwise ``(Q_dq @ K_dq^T) * scaling`` as an fp32 GEMM (float tensors used as they are).
    """
    n_rep = query.shape[1] // key.shape[1]
    scaling32 = torch.tensor(scaling, dtype=torch.float32, device=query.device)
    if q_bits is not None and k_bits is not None:
        q_c, q_s = quantize_heads(query, q_bits)
        k_c, k_s = quantize_heads(key, k_bits)
        acc = (q_c.double() @ _repeat_kv(k_c, n_rep).double().transpose(-1, -2)).float()
        return acc * (q_s.float() * scaling32).unsqueeze(-1) * _repeat_kv(k_s, n_rep).float().unsqueeze(-2)
    q = dequantize_rows(*quantize_heads(query, q_bits)) if q_bits is not None else query.float()
    k = dequantize_rows(*quantize_heads(key, k_bits)) if k_bits is not None else key.float()
    return (q @ _repeat_kv(k, n_rep).transpose(-1, -2)) * scaling32


def check_attention_inputs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                           finite: bool = True) -> None:
    """Validate the (B, Hq, Lq, D) / (B, Hkv, Lk, D) shapes, float dtypes, devices and (when
    `finite`; it costs a device sync) that no value is NaN/Inf."""
    check_tensor(query, "query", ndim=4, dtypes=_FLOATS, finite=finite)
    check_tensor(key, "key", ndim=4, dtypes=_FLOATS, finite=finite)
    check_tensor(value, "value", ndim=4, dtypes=_FLOATS, finite=finite)
    b, hq, _, d = query.shape
    if key.shape != value.shape:
        raise ValueError(f"key and value must have one shape, got {tuple(key.shape)} and "
                         f"{tuple(value.shape)}")
    bk, hkv, _, dk = key.shape
    if bk != b or dk != d or hq % hkv != 0:
        raise ValueError(f"key/value (B, Hkv, Lk, D) = {tuple(key.shape)} do not fit query "
                         f"(B, Hq, Lq, D) = {tuple(query.shape)}: need the same B and D and Hkv | Hq")
    if key.device != query.device or value.device != query.device:
        raise ValueError(f"query, key, value must be on one device, got {query.device}, "
                         f"{key.device}, {value.device}")


def check_attention_config(config) -> AttentionQuantConfig:
    if config is None:
        return AttentionQuantConfig()
    if not isinstance(config, AttentionQuantConfig):
        raise TypeError(f"config must be an AttentionQuantConfig, got {type(config).__name__}")
    return config


def check_scaling(scaling) -> float:
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not scaling > 0:
        raise ValueError(f"scaling must be a positive float, got {scaling!r}")
    return float(scaling)


# ------------------------------------------------------------------------------- the reference
def softmax_pv(scores: torch.Tensor, value: torch.Tensor, *, p_bits: int | None,
               v_bits: int | None) -> torch.Tensor:
    """O = (P_c @ V_dq) / l from masked scores (B, Hq, Lq, Lk) fp32 and value (B, Hkv, Lk, D).

    `value` is used as it is when `v_bits` is None (a dequantized KV cache passes fp16 V_dq).
    Returns fp32 (B, Hq, Lq, D). A row with every score -inf gets O = 0.
    """
    n_rep = scores.shape[1] // value.shape[1]
    m = scores.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    e = torch.exp(scores - m)
    if p_bits is not None:
        e = torch.round(e * float(2 ** p_bits - 1))
    l_sum = e.sum(dim=-1, keepdim=True)
    v = dequantize_v(*quantize_heads(value, v_bits)) if v_bits is not None else value
    out = e @ _repeat_kv(v.float(), n_rep)
    return torch.where(l_sum > 0, out / l_sum, torch.zeros_like(out))


def quantized_attention_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                  attention_mask: torch.Tensor | None = None, *, scaling: float,
                                  config: AttentionQuantConfig | None = None,
                                  is_causal: bool = True) -> torch.Tensor:
    """Quantized attention, pure PyTorch (the math of the module docstring).

    Args:
        query: (B, Hq, Lq, D) fp16/bf16/fp32, finite.
        key, value: (B, Hkv, Lk, D), same dtype family, Hkv divides Hq (GQA).
        attention_mask: additive float (or bool, True = attend) mask broadcastable to
            (B, 1, Lq, Lk) (its last dim may be longer than Lk: sliced), or None.
        scaling: the factor of QK^T (HF passes ``module.scaling``; OPT passes 1.0).
        config: bit widths (default `AttentionQuantConfig()`; `FLOAT_ATTENTION` = no rounding).
        is_causal: with no mask, apply the causal mask (bottom-right aligned) when Lq > 1.
    Returns:
        (B, Lq, Hq, D) in query.dtype, contiguous (HF's attention-function layout).
    """
    check_attention_inputs(query, key, value)
    config = check_attention_config(config)
    scaling = check_scaling(scaling)
    b, _, lq, _ = query.shape
    lk = key.shape[2]
    mask = prepare_mask(attention_mask, b, lq, lk, is_causal, query.device)
    s = attention_scores(query, key, scaling=scaling, q_bits=config.q_bits, k_bits=config.k_bits)
    if mask is not None:
        s = s + mask
    out = softmax_pv(s, value, p_bits=config.p_bits, v_bits=config.v_bits)
    return out.to(query.dtype).transpose(1, 2).contiguous()

