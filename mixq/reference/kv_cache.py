"""The 4-bit (or 8-bit) KIVI-style KV cache, as math on plain tensors: what
`mixq.hf.kv_cache.KV4Layer` stores and what `mixq.kernels.attention.kv4_decode_attention` reads.

For keys/values of shape (B, Hkv, T, D), with Tq = floor(T / G) * G tokens in whole groups::

    K: per channel over groups of G tokens (KIVI): one fp16 scale per (b, h, group, d)
           k_scale (B, Hkv, Tq/G, D) = fp16(max_{t in group} |K[t, d]| / qmax)  (0 -> 1)
           k_codes = clamp(round(K / k_scale), -2^(b-1), 2^(b-1)-1)
    V: per token over the whole head dim (`mixq.reference.attention.quantize_heads`): one fp16
       scale per (b, h, t)
           v_scale (B, Hkv, Tq) = fp16(max_d |V[t, d]| / qmax)                   (0 -> 1)
    codes: bits=4 -> uint8 (B, Hkv, Tq, D/2), two per byte along D, low nibble first
           (`mixq.quant.pack_int4`); bits=8 -> int8 (B, Hkv, Tq, D)
    the newest T - Tq tokens (the residual window) stay in float: k_res, v_res (B, Hkv, T-Tq, D)

Dequantization (`dequantize_kv`, the reference the decode kernel matches)::

    K_dq = fp32(k_codes) * fp32(k_scale[group])        V_dq = fp32(fp16(fp32(v_codes) * fp32(v_scale)))

followed by the residual tokens (cast to fp32). Keys are per channel because key outliers live
in fixed channels (KIVI); values per token because the attention output mixes values along
tokens.
"""
from __future__ import annotations

import torch

from mixq.quant import pack_int4, unpack_int4
from mixq.reference.attention import dequantize_v, quantize_heads
from mixq.reference.linear import quantize_per_token

__all__ = ["KV_BITS", "quantize_keys", "quantize_heads", "pack_codes", "unpack_codes",
           "dequantize_kv"]

KV_BITS = (4, 8)


def quantize_keys(k: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel key codes over groups of `group_size` tokens.

    Args:
        k: (B, H, nG*G, D) float, a whole number of groups.
    Returns:
        ``(codes int8 (B, H, nG*G, D), scale fp16 (B, H, nG, D))``.
    """
    b, h, n, d = k.shape
    g = group_size
    cols = k.reshape(b, h, n // g, g, d).transpose(-1, -2)            # (B, H, nG, D, G)
    codes, scale = quantize_per_token(cols.reshape(-1, g), bits)
    codes = codes.reshape(b, h, n // g, d, g).transpose(-1, -2).reshape(b, h, n, d)
    return codes, scale.reshape(b, h, n // g, d)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Stored form of int8 codes (..., D): uint8 (..., D/2) for bits=4, the codes for bits=8."""
    return pack_int4(codes) if bits == 4 else codes


def unpack_codes(stored: torch.Tensor, bits: int, head_dim: int) -> torch.Tensor:
    """Inverse of `pack_codes`: int8 codes (..., head_dim)."""
    if bits == 8:
        return stored
    if stored.shape[-2] == 0:                  # nothing quantized yet (unpack_int4 wants data)
        return torch.empty((*stored.shape[:-1], head_dim), dtype=torch.int8, device=stored.device)
    return unpack_int4(stored, head_dim)


def dequantize_kv(k_codes: torch.Tensor, k_scale: torch.Tensor, v_codes: torch.Tensor,
                  v_scale: torch.Tensor, k_res: torch.Tensor, v_res: torch.Tensor, *, bits: int,
                  group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The cached K and V (math in the module docstring): fp32 (B, Hkv, T, D) each.

    Args:
        k_codes, v_codes: stored codes (B, Hkv, Tq, D/2) uint8 (bits 4) or (B, Hkv, Tq, D) int8.
        k_scale: fp16 (B, Hkv, Tq/G, D). v_scale: fp16 (B, Hkv, Tq).
        k_res, v_res: the float residual window (B, Hkv, T - Tq, D).
        bits: 4 or 8. group_size: G.
    """
    d = k_res.shape[-1]
    k_q = (unpack_codes(k_codes, bits, d).float()
           * k_scale.float().repeat_interleave(group_size, dim=2))
    v_q = dequantize_v(unpack_codes(v_codes, bits, d), v_scale).float()
    return torch.cat([k_q, k_res.float()], dim=2), torch.cat([v_q, v_res.float()], dim=2)
