"""Triton kernel: dynamic per-token activation quantization with an FP16 outlier side tensor.

For activations x (M, K) and a split of the K channels into an int4 part (Kq channels) and k
outlier channels, one pass over x computes, per token (row) m::

    x_scale[m] = fp16(max_{c in int4 part} |x[m, c]| / qmax)         (0 -> 1; fp32 math)
    x_q[m, j]  = clamp(round(x[m, c_j] / x_scale[m]), qmin, qmax)     (IEEE division, half-even)
    x_out[m, i] = x[m, o_i]                                          (cast to fp16)

bit-identical to ``mixq.reference.quantize_per_token(x_int4_part, bits)`` on the int4 part.
The split is either

* ``n_outliers=k``: x is already permuted so the outliers are the last k channels:
  ``c_j = j`` (Kq = K - k) and ``o_i = Kq + i``; or
* ``outlier_idx`` (LongTensor (k,), distinct, any order): ``o_i = outlier_idx[i]`` and the
  int4 part is every other channel in original order.

Output formats of x_q: ``"packed"`` -> uint8 (M, ceil(Kq/2)), two codes per byte, low nibble
first (the `mixq.quant.pack_int4` layout, tail nibble 0); ``"int8"`` -> int8 (M, Kq), one code
per byte (for GEMMs that want plain int8 operands; also the W8A8 quantizer with bits=8).
``pad_to=p`` widens x_q to Ks = ceil(Kq / p) * p code columns, the extra codes 0 (written by the
same pass): the W4A4 GEMM takes x_q with its prepared weight's Kpad columns directly.

One program handles BLOCK_M tokens. When a row's int4 part fits one tile (Kq <= 8192) x is read
once: load, absmax, quantize and store from registers; otherwise a first loop finds the absmax
and a second loop re-reads (from L2) and quantizes. Loads are contiguous along K (16-byte
vectors) unless `outlier_idx` forces a gather.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from mixq.kernels._triton import autotune, check_kernel_device, m_bucket, op_name, round_up
from mixq.kernels.pack import cast_rne, round_half_even
from mixq.validation import check_quant_args, check_tensor

__all__ = ["act_quant", "outlier_gather_index"]

_IN_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SINGLE_PASS_MAX = 8192      # widest int4 part held in registers in one tile (per row)
_LOOP_BLOCK_K = 2048         # chunk width of the two-pass loop for wider rows
_MAX_TILE = 16384            # BLOCK_M * BLOCK_K cap: about 64 fp32 registers per thread at 8 warps


def _prune(configs, named_args, **kwargs):
    block_k = kwargs.get("BLOCK_K", named_args.get("BLOCK_K"))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] * block_k <= _MAX_TILE]
    return kept or configs[:1]


_CONFIGS = [
    triton.Config({"BLOCK_M": 1}, num_warps=4),
    triton.Config({"BLOCK_M": 1}, num_warps=8),
    triton.Config({"BLOCK_M": 2}, num_warps=4),
    triton.Config({"BLOCK_M": 4}, num_warps=4),
    triton.Config({"BLOCK_M": 4}, num_warps=8),
    triton.Config({"BLOCK_M": 8}, num_warps=8),
]


@triton.jit
def _quantize_tile(x, scale, QMIN: tl.constexpr, QMAX: tl.constexpr):
    """Integer codes (int32) of an fp32 tile x (BM, BK) with per-row fp32 scale (BM,)."""
    v = tl.math.div_rn(x, scale[:, None])
    return round_half_even(tl.minimum(tl.maximum(v, QMIN * 1.0), QMAX * 1.0)).to(tl.int32)


@triton.jit
def _store_codes(q_ptr, q, rows, rmask, k0, KS, stride_qm,
                 PACKED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Store codes q (BM, BK) int32 of columns k0..k0+BK (< KS, the stored row width): packed
    nibble pairs or int8."""
    if PACKED:
        lo, hi = tl.split(tl.reshape(q & 0xF, (BLOCK_M, BLOCK_K // 2, 2)))
        byte = (lo | (hi << 4)).to(tl.uint8)
        pcols = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        tl.store(q_ptr + rows[:, None] * stride_qm + pcols[None, :], byte,
                 mask=rmask[:, None] & (pcols < (KS + 1) // 2)[None, :])
    else:
        cols = k0 + tl.arange(0, BLOCK_K)
        tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :], q.to(tl.int8),
                 mask=rmask[:, None] & (cols < KS)[None, :])


@triton.jit
def _load_x(x_ptr, perm_ptr, rows, rmask, k0, KQ, stride_xm,
            HAS_PERM: tl.constexpr, BLOCK_K: tl.constexpr):
    """x[rows, c_j] for j in k0..k0+BK as fp32 (0 outside), c_j = perm[j] or j."""
    cols = k0 + tl.arange(0, BLOCK_K)
    cmask = cols < KQ
    if HAS_PERM:
        src = tl.load(perm_ptr + cols, mask=cmask, other=0)
    else:
        src = cols
    return tl.load(x_ptr + rows[:, None] * stride_xm + src[None, :],
                   mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)


@autotune(_CONFIGS, key=["KQ", "KS", "KO", "M_BUCKET", "PACKED"],
          prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _act_quant_kernel(x_ptr, perm_ptr, q_ptr, s_ptr, o_ptr, M, KQ, KS, KO, M_BUCKET,
                      stride_xm, stride_qm, stride_om,
                      HAS_PERM: tl.constexpr, PACKED: tl.constexpr,
                      QMIN: tl.constexpr, QMAX: tl.constexpr,
                      SINGLE_PASS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_O: tl.constexpr,
                      BLOCK_M: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    if SINGLE_PASS:
        x = _load_x(x_ptr, perm_ptr, rows, rmask, 0, KQ, stride_xm, HAS_PERM, BLOCK_K)
        absmax = tl.max(tl.abs(x), axis=1)
    else:
        absmax = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, KQ, BLOCK_K):
            xk = _load_x(x_ptr, perm_ptr, rows, rmask, k0, KQ, stride_xm, HAS_PERM, BLOCK_K)
            absmax = tl.maximum(absmax, tl.max(tl.abs(xk), axis=1))
    scale = tl.math.div_rn(absmax, QMAX * 1.0).to(tl.float16)
    scale = tl.where(scale == 0, 1.0, scale).to(tl.float16)
    tl.store(s_ptr + rows, scale, mask=rmask)
    s32 = scale.to(tl.float32)
    if SINGLE_PASS:
        q = _quantize_tile(x, s32, QMIN, QMAX)          # columns KQ..KS read as 0 -> code 0
        _store_codes(q_ptr, q, rows, rmask, 0, KS, stride_qm, PACKED, BLOCK_M, BLOCK_K)
    else:
        for k0 in range(0, KS, BLOCK_K):
            xk = _load_x(x_ptr, perm_ptr, rows, rmask, k0, KQ, stride_xm, HAS_PERM, BLOCK_K)
            q = _quantize_tile(xk, s32, QMIN, QMAX)
            _store_codes(q_ptr, q, rows, rmask, k0, KS, stride_qm, PACKED, BLOCK_M, BLOCK_K)
    # the outlier channels: a plain copy (cast to x_out's dtype)
    for o0 in range(0, KO, BLOCK_O):
        ocols = o0 + tl.arange(0, BLOCK_O)
        omask = ocols < KO
        if HAS_PERM:
            src = tl.load(perm_ptr + KQ + ocols, mask=omask, other=0)
        else:
            src = KQ + ocols
        m2 = rmask[:, None] & omask[None, :]
        xo = tl.load(x_ptr + rows[:, None] * stride_xm + src[None, :], mask=m2, other=0.0)
        tl.store(o_ptr + rows[:, None] * stride_om + ocols[None, :],
                 cast_rne(xo, o_ptr.dtype.element_ty), mask=m2)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def outlier_gather_index(k_total: int, outlier_idx: torch.Tensor) -> torch.Tensor:
    """int32 (K,) gather index ``[int4 channels in original order | outlier_idx in given order]``.

    Validates `outlier_idx` (in range, distinct); that check synchronizes with the device, so
    for a static outlier set compute the index once, or permute the weights offline and use
    ``n_outliers`` instead.
    """
    check_tensor(outlier_idx, "outlier_idx", ndim=1, nonempty=False,
                 dtypes=(torch.int64, torch.int32))
    k = outlier_idx.numel()
    if k > k_total:
        raise ValueError(f"outlier_idx has {k} entries but x has only K={k_total} channels")
    if k:
        lo, hi = int(outlier_idx.min()), int(outlier_idx.max())
        if lo < 0 or hi >= k_total:
            raise ValueError(f"outlier_idx values must be in [0, {k_total - 1}], got range [{lo}, {hi}]")
    is_out = torch.zeros(k_total, dtype=torch.bool, device=outlier_idx.device)
    is_out[outlier_idx.long()] = True
    if int(is_out.sum()) != k:
        raise ValueError("outlier_idx has repeated channels; they must be distinct")
    regular = torch.nonzero(~is_out, as_tuple=False).flatten()
    return torch.cat([regular, outlier_idx.long()]).to(torch.int32)


def _act_quant_impl(x, gather_idx, n_outliers, out_format, bits, out_dtype, pad_to=1):
    m, k_total = x.shape
    kq = k_total - n_outliers
    ks = round_up(kq, pad_to)                 # stored code columns, the extra codes 0
    packed = out_format == "packed"
    x_q = torch.empty((m, (ks + 1) // 2) if packed else (m, ks),
                      dtype=torch.uint8 if packed else torch.int8, device=x.device)
    x_scale = torch.empty((m, 1), dtype=torch.float16, device=x.device)
    x_out = torch.empty((m, n_outliers), dtype=out_dtype, device=x.device)
    single = ks <= _SINGLE_PASS_MAX
    block_k = max(_next_pow2(ks), 16) if single else _LOOP_BLOCK_K
    block_o = min(max(_next_pow2(n_outliers), 16), 1024)
    perm = gather_idx if gather_idx is not None else x_scale   # dummy pointer, never read
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)     # noqa: E731
    _act_quant_kernel[grid](
        x, perm, x_q, x_scale, x_out, m, kq, ks, n_outliers, m_bucket(m),
        x.stride(0), x_q.stride(0), max(n_outliers, 1),
        HAS_PERM=gather_idx is not None, PACKED=packed,
        QMIN=-(2 ** (bits - 1)), QMAX=2 ** (bits - 1) - 1,
        SINGLE_PASS=single, BLOCK_K=block_k, BLOCK_O=block_o)
    return x_q, x_scale, x_out


@torch.library.custom_op(op_name("act_quant"), mutates_args=())
def _act_quant_op(x: torch.Tensor, gather_idx: Optional[torch.Tensor], n_outliers: int,
                  out_format: str, bits: int, out_dtype: torch.dtype,
                  pad_to: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _act_quant_impl(x, gather_idx, n_outliers, out_format, bits, out_dtype, pad_to)


@_act_quant_op.register_fake
def _(x, gather_idx, n_outliers, out_format, bits, out_dtype, pad_to):
    m, k_total = x.shape
    ks = round_up(k_total - n_outliers, pad_to)
    if out_format == "packed":
        x_q = x.new_empty((m, (ks + 1) // 2), dtype=torch.uint8)
    else:
        x_q = x.new_empty((m, ks), dtype=torch.int8)
    return x_q, x.new_empty((m, 1), dtype=torch.float16), x.new_empty((m, n_outliers), dtype=out_dtype)


def resolve_outliers(x: torch.Tensor, n_outliers: int, outlier_idx: torch.Tensor | None
                     ) -> tuple[torch.Tensor | None, int]:
    """``(gather_idx or None, k)`` for "the last `n_outliers` channels" or `outlier_idx`.

    Checks the two are exclusive, `outlier_idx` is on x's device (a sync to validate it), and
    at least one channel of x (M, K) stays int4.
    """
    gather_idx = None
    if outlier_idx is not None:
        if n_outliers:
            raise ValueError("pass either n_outliers or outlier_idx, not both")
        if outlier_idx.device != x.device:
            raise ValueError(f"outlier_idx is on {outlier_idx.device} but x is on {x.device}")
        gather_idx = outlier_gather_index(x.shape[1], outlier_idx)
        n_outliers = outlier_idx.numel()
    if n_outliers >= x.shape[1]:
        raise ValueError(f"x (shape {tuple(x.shape)}) needs at least one int4 channel, "
                         f"got {n_outliers} outliers")
    return gather_idx, n_outliers


def act_quant(x: torch.Tensor, *, n_outliers: int = 0, outlier_idx: torch.Tensor | None = None,
              out_format: str = "packed", bits: int = 4, out_dtype: torch.dtype = torch.float16,
              pad_to: int = 1, gather_idx: torch.Tensor | None = None,
              validate: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token symmetric quantization of the int4 part of `x` plus the outlier copy, one pass.

    Args:
        x: (M, K) fp16/bf16/fp32, contiguous; CUDA (or CPU under TRITON_INTERPRET=1).
            Values must be finite (NaN/Inf give unspecified codes; not checked, hot path).
        n_outliers: k >= 0; the last k channels of x are the outliers (x already permuted).
        outlier_idx: alternatively, LongTensor (k,) of distinct channel indices (any order);
            exclusive with a nonzero `n_outliers`. Costs a device sync to validate.
        out_format: "packed" (uint8 (M, ceil(Kq/2)), bits <= 4) or "int8" (int8 (M, Kq)).
        bits: 2..8 bit signed grid [-2^(bits-1), 2^(bits-1)-1]; "packed" needs bits <= 4.
        out_dtype: dtype of x_out (fp16 by contract; bf16/fp32 allowed).
        pad_to: store Ks = Kq rounded up to a multiple of `pad_to` code columns, the extra
            codes 0 (for the W4A4 GEMM: ``pad_to=block_k`` gives x_q the prepared weight's
            Kpad columns, so the GEMM needs no tail step and no padding copy).
        gather_idx: alternatively to `outlier_idx`, a precomputed int32 (K,) channel order on
            x's device, e.g. ``outlier_gather_index(K, idx)`` built once: the kernel reads
            channel ``gather_idx[j]`` as column j, and the last `n_outliers` columns are the
            outliers. Trusted (not validated: no sync) -- a permutation of range(K).
        validate: False skips every argument check (for callers that validated their
            operands once, at build time: `mixq.nn.W4A4Linear`); wrong arguments then give
            wrong results or a launch error instead of a clear message.
    Returns:
        ``(x_q, x_scale, x_out)``: x_q as `out_format` with Ks columns (int8 (M, Ks), packed
        (M, ceil(Ks/2))); x_scale fp16 (M, 1); x_out (M, k)
        `out_dtype` with ``x_out[:, i] = x[:, o_i]`` (o = the last k channels or `outlier_idx`).
    Raises:
        TypeError / ValueError on a bad dtype, shape, device, layout or argument.
    """
    # the custom op makes the kernel traceable by torch.compile; eager calls skip its dispatch
    impl = _act_quant_op if torch.compiler.is_compiling() else _act_quant_impl
    if not validate:
        return impl(x, gather_idx, n_outliers, out_format, bits, out_dtype, pad_to)
    check_tensor(x, "x", ndim=2, dtypes=_IN_DTYPES, contiguous=True)
    check_kernel_device(x, "x")
    check_quant_args(out_format, bits, n_outliers)
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {[str(d) for d in _OUT_DTYPES]}, got {out_dtype}")
    if isinstance(pad_to, bool) or not isinstance(pad_to, int) or pad_to < 1:
        raise ValueError(f"pad_to must be a positive int, got {pad_to!r}")
    if gather_idx is not None:
        if outlier_idx is not None:
            raise ValueError("pass either outlier_idx or gather_idx, not both")
        check_tensor(gather_idx, "gather_idx", ndim=1, dtypes=(torch.int32,), contiguous=True,
                     device=x.device)
        if gather_idx.shape[0] != x.shape[1]:
            raise ValueError(f"gather_idx must have shape ({x.shape[1]},) for x of shape "
                             f"{tuple(x.shape)}, got {tuple(gather_idx.shape)}")
        _, n_outliers = resolve_outliers(x, n_outliers, None)
    else:
        gather_idx, n_outliers = resolve_outliers(x, n_outliers, outlier_idx)
    return impl(x, gather_idx, n_outliers, out_format, bits, out_dtype, pad_to)
