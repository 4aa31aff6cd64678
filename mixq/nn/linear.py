"""Quantized drop-in replacements for `torch.nn.Linear`: FP16, W8A8, W4A16 and W4A4 (+ FP16 outliers).

Every module is built once from a trained `nn.Linear` with ``from_linear``; the weight is quantized
statically (int values + fp16 scales stored as buffers) and never touched again. ``forward``
quantizes activations dynamically, per token, and does the math of `mixq.reference`:

=============  ====================================  =============================================
module         weight storage                        forward (x: (..., K) float -> (..., N))
=============  ====================================  =============================================
FP16Linear     W fp16/bf16 (N, K)                    y = x.half() @ W.T + b            (in fp16)
W8A8Linear     int8 (N, K), fp16 scale (N, 1)        reference.w8a8_linear (int8 per token)
W4A16Linear    int4 packed (N, K/2), fp16 scales     y = x.float() @ dequant(W).T + b
W4A4Linear     int4 packed (N, Kq/2), fp16 scales,   x -> [x_reg | x_out] by the static outlier
               W_out fp16 (N, k)                     permutation; y = Q4(x_reg) Q4(W)^T * scales
                                                     + x_out.half() @ W_out.T + b
=============  ====================================  =============================================

Weights with "row" (per output channel) or "group" scales go through the integer reference
(`reference.w4a4_linear`: int4 x int4 -> exact int32 accumulate, then rescale). Weights with
"tile" (8x8 blocks) scales cannot: a tile scale changes every 8 columns along K *inside* the dot
product of one output, so it cannot be pulled out of an integer accumulation over K (an int
kernel would have to rescale every 8-wide K slice, i.e. fp32 accumulation of tiny int dot
products -- no longer an int GEMM). For tile weights (and "tensor" weights, which the reference
has no scale layout for) the module uses fake-quant with the same rounding: dequantized weights,
per-token fake-quantized activations, an fp32 matmul -- equal to the integer math up to fp32
summation order.

All arithmetic happens in `_forward_impl(x2d) -> (M, N)`, the single place a CUDA kernel
dispatch will hook in; ``forward`` only validates, flattens leading dims and casts the result
back to the input dtype.

Padding: when K (minus outliers) is not a multiple of the group size / tile width, the int part
of the weight is zero-padded along K to ``k_padded`` columns (and the activations are zero-padded
in forward): zeros change no block's absmax and add nothing to a dot product. Tile rows are not
padded in storage; the last row of tiles simply has fewer rows. `weight_nbytes` counts the
padded storage, i.e. what a kernel would really read.

Memory: an int4 layer keeps its codes once, packed two per byte (``w_packed``) in the layout
its kernel reads -- W4A16: `quant.pack_int4` (low nibble first); W4A4: `quant.pack_int4_blocked`
in blocks of 128 columns (``weight_layout = "int4-blocked128"``, the W4A4 GEMM's operand as is).
The int8 ``w_q`` is a derived read-only view. Caches derived from the buffers are non-persistent,
dropped on ``.to()`` / ``load_state_dict`` and rebuilt on demand: ``w_q_cache`` (int8, the
reference path; `release_unpacked` frees it). A W4A4 layer also holds ``gather_idx`` (int32
``perm``, the activation-quant kernel's channel gather; non-persistent, built with the module
and after every load, moved by ``.to()``, so a compiled forward never has to create it).
`module_memory_bytes` counts everything a module really holds, caches included.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from mixq import outliers as _outliers
from mixq import quant, reference
from mixq.config import FLOAT_MODES, QuantSpec, check_mode, default_specs
from mixq.nn.norm import take_prequantized
from mixq.validation import FLOAT_DTYPES, check_tensor, hot_path

#: Weight grids a module gets when given none: those of `mixq.config.default_specs` (int4
#: symmetric groups of 128; int8 per output channel), the same as `QuantConfig`'s "auto".
DEFAULT_W4_SPEC = default_specs("w4a4")[0]
#: K block of mixq.kernels.w4a4 (kept here so nn imports no triton): W4A4Linear's weight layout
W4A4_WEIGHT_BLOCK = 128
_W4A4_BLOCK_K = W4A4_WEIGHT_BLOCK
#: ``W4A4Linear.weight_layout``: w_packed is `quant.pack_int4_blocked(w_q, 128)` (checkpoints
#: without the attribute hold `quant.pack_int4` codes; `mixq.io` converts them on load).
WEIGHT_LAYOUT_W4A4 = "int4-blocked128"
#: token counts up to this take the fused decode kernel (`mixq.kernels.w4a4_decode`). 0 = off:
#: on the H100 it measured 2-3x slower than act_quant + w4a4_gemm (every program re-quantizes
#: the rows: results/gemm_module_h100.md), so it stays opt-in until it is tuned.
W4A4_DECODE_MAX_M = 0
_KERNEL_OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DEFAULT_W8_SPEC = default_specs("w8a8")[0]

__all__ = ["W4A4_WEIGHT_BLOCK", "WEIGHT_LAYOUT_W4A4", "QuantLinearBase", "FP16Linear", "W8A8Linear", "W4A16Linear", "W4A4Linear",
           "RotatedInputLinear", "DEFAULT_W4_SPEC", "DEFAULT_W8_SPEC", "quantize_linear",
           "module_weight_nbytes", "module_memory_bytes", "DERIVED_BUFFERS"]


# ----------------------------------------------------------------------------- weight helpers
def _check_linear(linear) -> None:
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
    check_tensor(linear.weight, "linear.weight", ndim=2, dtypes=FLOAT_DTYPES, finite=True)
    if linear.bias is not None:
        check_tensor(linear.bias, "linear.bias", ndim=1, dtypes=FLOAT_DTYPES, finite=True)


def _check_spec(spec, name: str, *, max_bits: int, symmetric_only: bool,
                granularities: tuple[str, ...]) -> QuantSpec:
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"{name} must be a mixq.config.QuantSpec, got {type(spec).__name__}")
    if spec.bits > max_bits:
        raise ValueError(f"{name}.bits must be <= {max_bits} for this module, got {spec.bits}")
    if symmetric_only and not spec.symmetric:
        raise ValueError(f"{name} must be symmetric for this module, got {spec.describe()}")
    if spec.granularity not in granularities:
        raise ValueError(f"{name}.granularity must be one of {granularities}, "
                         f"got {spec.granularity!r}")
    return spec


def _quantize_weight(w: torch.Tensor, spec: QuantSpec):
    """Quantize a weight (N, K) with `spec`, zero-padding K (and tile rows) as needed.

    Returns (w_q int8 (N, Kp), w_scale fp16 compact, w_zero or None, Kp) where Kp is K rounded
    up to the block width; the scale/zero shapes are those of `quant.quantize` on the padded
    matrix (tile: (ceil(N/tr), Kp/tc)).
    """
    n, k = w.shape
    kp = math.ceil(k / spec.block_cols) * spec.block_cols
    np_ = math.ceil(n / spec.tile[0]) * spec.tile[0] if spec.granularity == "tile" else n
    w_pad = torch.zeros(np_, kp, dtype=torch.float32, device=w.device)
    w_pad[:n, :k] = w.float()
    qt = quant.quantize(w_pad, spec, scale_dtype=torch.float16)
    zero = None if qt.zero is None else qt.zero.contiguous()
    return qt.q[:n].contiguous(), qt.scale.contiguous(), zero, kp


def _expand_blocks(t: torch.Tensor, spec: QuantSpec, n: int, kp: int) -> torch.Tensor:
    """Broadcast a compact per-block tensor (scale or zero) to the (n, kp) weight, in fp32.

    Tile rows may be padded (the scale has ceil(n/tr) rows): expand to the padded shape, slice."""
    np_ = math.ceil(n / spec.tile[0]) * spec.tile[0] if spec.granularity == "tile" else n
    return quant.expand_blocks(t, (np_, kp), spec)[:n].float()


def _pad_cols(x: torch.Tensor, k: int) -> torch.Tensor:
    """Zero-pad the last dim of a 2-D tensor to k columns (no copy when already k)."""
    if x.shape[1] == k:
        return x
    return torch.nn.functional.pad(x, (0, k - x.shape[1]))


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


# ----------------------------------------------------------------------------- base class
class QuantLinearBase(nn.Module):
    """Common shell of the quantized linears: input checks, leading dims, output dtype.

    Subclasses implement `_forward_impl(x2d: (M, K) float) -> (M, N) float` (the math; where a
    CUDA kernel dispatch goes) and `weight_nbytes()`.
    """

    in_features: int
    out_features: int
    #: Triton kernel dispatch: None = automatic (CUDA inputs on a capable GPU), True = always
    #: (CPU inputs then run under TRITON_INTERPRET=1, which is how CI tests the dispatch),
    #: False = always the pure-torch reference.
    use_kernels: bool | None = None

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)

    def _register_bias(self, linear: nn.Linear, dtype: torch.dtype = torch.float16) -> None:
        bias = None if linear.bias is None else linear.bias.detach().to(dtype).clone()
        self.register_buffer("bias", bias)

    @hot_path
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = layer(x). No host synchronisation: only metadata is checked here (values were
        checked when the module was built or loaded; see `mixq.validation`).

        Args:
            x: (..., K) float16/bfloat16/float32/float64 on the module's device, K = in_features.
        Returns:
            (..., N) in x.dtype, N = out_features (computed as documented per module, in fp32
            unless stated).
        """
        check_tensor(x, "x", dtypes=FLOAT_DTYPES, device=self._device())
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape (..., {self.in_features}), got {tuple(x.shape)}")
        lead = x.shape[:-1]
        y = self._forward_impl(x.reshape(-1, self.in_features))
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def _device(self) -> torch.device:
        for t in self._buffers.values():        # cheaper than self.buffers() (a generator)
            if t is not None:
                return t.device
        return next(iter(self.buffers())).device

    def _wants_kernel(self, x: torch.Tensor, kernel: str) -> bool:
        """Whether `x` goes through the Triton kernel `kernel` (see `use_kernels`)."""
        if self.use_kernels is False or (self.use_kernels is None and not x.is_cuda):
            return False
        from mixq.kernels._triton import fallback_to_reference
        return not fallback_to_reference(x, kernel)

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def weight_nbytes(self) -> int:  # pragma: no cover - abstract
        """Bytes of the stored weight (see each subclass)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


# ----------------------------------------------------------------------------- FP16
class FP16Linear(QuantLinearBase):
    """Half-precision linear: weight, bias, activations and the matmul in `dtype`.

    Buffers: ``weight`` (N, K) `dtype`, ``bias`` (N,) `dtype` or None.
    forward: y = (x.to(dtype) @ weight.T + bias) computed in `dtype`, returned in x.dtype.
    """

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype) -> None:
        super().__init__(in_features, out_features)
        self.dtype = dtype

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, dtype: torch.dtype = torch.float16) -> "FP16Linear":
        """Copy `linear` into `dtype` (torch.float16 or torch.bfloat16)."""
        _check_linear(linear)
        if dtype not in (torch.float16, torch.bfloat16):
            raise TypeError(f"dtype must be torch.float16 or torch.bfloat16, got {dtype}")
        m = cls(linear.in_features, linear.out_features, dtype)
        m.register_buffer("weight", linear.weight.detach().to(dtype).clone())
        m._register_bias(linear, dtype)
        return m

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x.to(self.dtype), self.weight, self.bias)

    def weight_nbytes(self) -> int:
        """weight + bias bytes: (N*K + N) * 2."""
        return _nbytes(self.weight, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", dtype={self.dtype}"


# ----------------------------------------------------------------------------- W8A8
class W8A8Linear(QuantLinearBase):
    """int8 per-output-channel weights, int8 per-token activations (SmoothQuant-style W8A8).

    Buffers: ``w_q`` int8 (N, K) in [-128, 127]; ``w_scale`` fp16 (N, 1); ``bias`` fp16 (N,) or None.
    forward: `reference.w8a8_linear`: x_q, x_scale = per-token int8 of x;
    y = (x_q @ w_q.T) [int32, exact] * x_scale * w_scale + bias, in fp32.
    """

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, weight_spec: QuantSpec = DEFAULT_W8_SPEC
                    ) -> "W8A8Linear":
        """Quantize `linear.weight` (N, K) per output row to int8 (weight_spec must be int8 'row')."""
        _check_linear(linear)
        _check_spec(weight_spec, "weight_spec", max_bits=8, symmetric_only=True,
                    granularities=("row",))
        if weight_spec.bits != 8:
            raise ValueError(f"weight_spec.bits must be 8 for W8A8Linear, got {weight_spec.bits}")
        m = cls(linear.in_features, linear.out_features)
        m.weight_spec = weight_spec
        qt = quant.quantize(linear.weight.detach().float(), weight_spec, scale_dtype=torch.float16)
        m.register_buffer("w_q", qt.q.contiguous())
        m.register_buffer("w_scale", qt.scale.contiguous())
        m._register_bias(linear)
        return m

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in _KERNEL_OUT_DTYPES and self._wants_kernel(x, "w8a8"):
            from mixq.kernels.w8a8 import pad_weight_for_int_mm, w8a8_matmul
            if getattr(self, "w_kernel", None) is None or self.w_kernel.device != x.device:
                # zero-padded to the int8 GEMM's alignment once (not saved: derived from w_q)
                self.register_buffer("w_kernel", pad_weight_for_int_mm(self.w_q.to(x.device)),
                                     persistent=False)
            return w8a8_matmul(x.contiguous(), self.w_kernel, self.w_scale, bias=self.bias,
                               n=self.out_features)
        return reference.w8a8_linear(x, self.w_q, self.w_scale, bias=self.bias)

    def weight_nbytes(self) -> int:
        """N*K (int8) + N*2 (fp16 scales) + N*2 (fp16 bias)."""
        return _nbytes(self.w_q, self.w_scale, self.bias)


# ----------------------------------------------------------------------------- int4 weights
#: Buffers that are caches derived from the persistent ones (never saved, rebuilt on demand).
#: Non-persistent caches; "w_kernel" is W8A8's padded int8 weight (and a W4A4 cache that older
#: saves listed).
DERIVED_BUFFERS = frozenset({"w_kernel", "w_q_cache"})


class _Int4WeightMixin:
    """Storage shared by W4A16 and W4A4: packed int4 weight + scales (+ zeros).

    Persistent: ``w_packed`` uint8 (N, ceil(Kp/2)), two int4 codes per byte along K, low nibble
    first (`quant.pack_int4`), the only copy of the codes (0.5 byte per weight). ``w_q`` -- the
    int8 (N, Kp) codes the pure-torch reference reads -- is a read-only view derived from it:
    ``w_q = quant.unpack_int4(w_packed, Kp, signed=weight_spec.symmetric)`` (symmetric codes in
    [-qmax-1, qmax], asymmetric in [0, 2**bits - 1]; exact). The reference forward caches it in
    the non-persistent buffer ``w_q_cache`` (1 byte per weight, dropped by `release_unpacked`);
    the kernel paths never build it.
    """

    def _store_int4_weight(self, w: torch.Tensor, spec: QuantSpec) -> None:
        w_q, w_scale, w_zero, kp = _quantize_weight(w, spec)
        self.weight_spec = spec
        self.k_padded = kp
        self.register_buffer("w_scale", w_scale)    # fp16 compact
        self.register_buffer("w_zero", w_zero)      # asymmetric only
        self.register_buffer("w_packed", self._pack_codes(w_q))
        del w_q

    def _pack_codes(self, w_q: torch.Tensor) -> torch.Tensor:
        """The stored form of int8 (N, Kp) codes (`quant.pack_int4`; W4A4 overrides)."""
        return quant.pack_int4(w_q, signed=self.weight_spec.symmetric)

    def set_int4_codes(self, w_q: torch.Tensor, w_scale: torch.Tensor,
                       w_zero: torch.Tensor | None = None) -> None:
        """Replace the weight codes and scales (same layout as the current ones), drop caches.

        Args:
            w_q: integer (N, Kp) codes, [-2**(b-1), 2**(b-1)-1] (symmetric spec) or
                [0, 2**b - 1] (asymmetric), b = weight_spec.bits; packed, not kept.
            w_scale: float, the shape of ``self.w_scale`` (stored fp16).
            w_zero: the shape of ``self.w_zero`` (asymmetric specs), else None.
        """
        n, kp = self.out_features, self.k_padded
        check_tensor(w_q, "w_q", ndim=2, dtypes=(torch.int8, torch.uint8, torch.int16,
                                                   torch.int32, torch.int64))
        if tuple(w_q.shape) != (n, kp):
            raise ValueError(f"w_q must have shape ({n}, {kp}), got {tuple(w_q.shape)}")
        check_tensor(w_scale, "w_scale", dtypes=FLOAT_DTYPES, finite=True)
        if tuple(w_scale.shape) != tuple(self.w_scale.shape):
            raise ValueError(f"w_scale must have shape {tuple(self.w_scale.shape)}, "
                             f"got {tuple(w_scale.shape)}")
        if (w_zero is None) != (self.w_zero is None):
            raise ValueError("w_zero must be given exactly when the weight spec is asymmetric")
        if w_zero is not None and tuple(w_zero.shape) != tuple(self.w_zero.shape):
            raise ValueError(f"w_zero must have shape {tuple(self.w_zero.shape)}, "
                             f"got {tuple(w_zero.shape)}")
        dev = self.w_packed.device
        self.w_packed = self._pack_codes(w_q.to(dev))
        self.w_scale = w_scale.to(device=dev, dtype=torch.float16).contiguous()
        if w_zero is not None:
            self.w_zero = w_zero.to(device=dev, dtype=self.w_zero.dtype).contiguous()
        self._drop_derived()

    def _unpack(self) -> torch.Tensor:
        return quant.unpack_int4(self.w_packed, self.k_padded, signed=self.weight_spec.symmetric)

    def _packed_key(self) -> tuple:
        """Identity of the current ``w_packed`` contents: storage, device and in-place version
        (in-place writes bump `_version`), so a cache built from older codes is never used."""
        p = self.w_packed
        try:
            version = p._version
        except RuntimeError:                        # inference tensors keep no version counter
            version = None
        return (p.device, p.data_ptr(), version)

    def _cached(self, name: str):
        """The derived buffer `name` if it was built from the current ``w_packed``, else None."""
        t = self._buffers.get(name)
        if t is None or torch.compiler.is_compiling():  # traced graphs keep what eager built
            return t
        return t if getattr(self, f"_{name}_key", None) == self._packed_key() else None

    def _drop_derived(self) -> None:
        for name in DERIVED_BUFFERS:
            self._buffers.pop(name, None)

    def _apply(self, *args, **kwargs):
        # .to()/.cuda()/.half(): caches are rebuilt on demand on the new device, not moved along
        self._drop_derived()
        return super()._apply(*args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self._drop_derived()                        # new codes: the caches are stale
        return super()._load_from_state_dict(*args, **kwargs)

    def _cache(self, name: str, t: torch.Tensor) -> torch.Tensor:
        self._buffers.pop(name, None)               # free the stale copy before keeping `t`
        self.register_buffer(name, t, persistent=False)
        setattr(self, f"_{name}_key", self._packed_key())
        return t

    @property
    def w_q(self) -> torch.Tensor:
        """int8 (N, Kp) int4 codes (read-only): the cache if the reference path built one, else
        a fresh unpack of ``w_packed`` that is not kept."""
        cached = self._cached("w_q_cache")
        return cached if cached is not None else self._unpack()

    def _reference_w_q(self) -> torch.Tensor:
        """``w_q`` for the pure-torch reference, unpacked once and cached (``w_q_cache``)."""
        cached = self._cached("w_q_cache")
        return cached if cached is not None else self._cache("w_q_cache", self._unpack())

    def release_unpacked(self) -> None:
        """Drop the reference path's int8 cache ``w_q_cache`` (rebuilt on the next reference
        forward); afterwards the layer holds only the packed codes, scales and float tensors."""
        self._buffers.pop("w_q_cache", None)

    def _dequantize(self, q: torch.Tensor) -> torch.Tensor:
        n, kp = q.shape
        q = q.float()
        if self.w_zero is not None:
            q = q - _expand_blocks(self.w_zero, self.weight_spec, n, kp)
        return q * _expand_blocks(self.w_scale, self.weight_spec, n, kp)

    def dequantized_weight(self) -> torch.Tensor:
        """The int part of the weight in fp32, (N, Kp): (w_q - w_zero) * w_scale per block."""
        return self._dequantize(self.w_q)

    def _int4_nbytes(self) -> int:
        return _nbytes(self.w_packed, self.w_scale, self.w_zero)


class W4A16Linear(_Int4WeightMixin, QuantLinearBase):
    """Weight-only int4 (GPTQ/AWQ-style storage), activations kept in floating point.

    Buffers: ``w_packed`` uint8 (N, ceil(Kp/2)) packed int4 codes (``w_q``, int8 (N, Kp), is a
    read-only view unpacked from it: see `_Int4WeightMixin`);
    ``w_scale`` fp16 compact (row (N,1), group (N,Kp/g), tile (ceil(N/tr),Kp/tc), tensor (1,1));
    ``w_zero`` (asymmetric specs) or None; ``bias`` fp16 (N,) or None.
    forward: y = x.float() @ dequant(W).T + bias in fp32 (row/group: `reference.w4a16_linear`).
    """

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, weight_spec: QuantSpec = DEFAULT_W4_SPEC
                    ) -> "W4A16Linear":
        """Quantize `linear.weight` (N, K) to int4 (weight_spec: bits <= 4, any granularity)."""
        _check_linear(linear)
        _check_spec(weight_spec, "weight_spec", max_bits=4, symmetric_only=False,
                    granularities=("tensor", "row", "group", "tile"))
        m = cls(linear.in_features, linear.out_features)
        m._store_int4_weight(linear.weight.detach(), weight_spec)
        m._register_bias(linear)
        return m

    @property
    def kernel_path(self) -> bool:
        """True when the Triton W4A16 kernel can run this layer (row or group scales)."""
        return self.weight_spec.granularity in ("row", "group")

    def _forward_kernel(self, x: torch.Tensor) -> torch.Tensor:
        """`mixq.kernels.w4a16.w4a16_matmul` on the packed weight: fp16/bf16 activations,
        fp32 accumulation, output in x.dtype (gemv / split-K decode / tensor-core GEMM by M)."""
        from mixq.kernels.w4a16 import w4a16_matmul
        g = self.weight_spec.group_size if self.weight_spec.granularity == "group" else self.k_padded
        return w4a16_matmul(x.contiguous(), self.w_packed, self.w_scale, g, w_zero=self.w_zero,
                            bias=self.bias)

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        x = _pad_cols(x, self.k_padded)
        if (self.kernel_path and x.dtype in (torch.float16, torch.bfloat16)
                and self._wants_kernel(x, "w4a16")):
            return self._forward_kernel(x)
        if self.weight_spec.granularity in ("row", "group"):
            g = self.weight_spec.group_size if self.weight_spec.granularity == "group" else None
            return reference.w4a16_linear(x, self._reference_w_q(), self.w_scale, group_size=g,
                                          w_zero=self.w_zero, bias=self.bias)
        y = x.float() @ self._dequantize(self._reference_w_q()).T
        return y if self.bias is None else y + self.bias.float()

    def weight_nbytes(self) -> int:
        """packed int4 N*ceil(Kp/2) + scales (+ zeros) + fp16 bias."""
        return self._int4_nbytes() + _nbytes(self.bias)


class W4A4Linear(_Int4WeightMixin, QuantLinearBase):
    """int4 weights x int4 per-token activations, with k static FP16 outlier input channels.

    The k channels in ``outlier_idx`` (chosen offline, e.g. from calibration max |x|) bypass
    quantization: ``perm = outliers.outlier_permutation(K, outlier_idx)`` puts the Kq = K - k
    regular channels first, so x[:, perm] = [x_reg (M, Kq) | x_out (M, k)].

    Buffers: ``perm`` int64 (K,); ``outlier_idx`` int64 (k,) sorted; ``w_packed`` uint8
    (N, Kb/2) int4 codes in the W4A4 GEMM's layout, ``quant.pack_int4_blocked(w_q, 128)``
    (Kp = Kq padded to the scale block width, Kb = Kp rounded up to 128; ``w_q``, int8 (N, Kp),
    is a read-only view unpacked from it); ``w_scale`` fp16 compact (see W4A16Linear);
    ``w_out`` fp16 (N, k) = W[:, outlier_idx]; ``bias`` fp16 or None. Non-persistent caches:
    ``gather_idx`` (int32 perm, the kernel path's gather; `prepare_gather_index`),
    ``w_q_cache`` (reference path).

    forward, x (M, K) -> fp32 (M, N):
        x_reg, x_out = split(x[:, perm]);  x_q, x_scale = quantize_per_token(x_reg, act_bits)
        y = (x_q @ w_q.T) * x_scale * w_scale  +  x_out.half() @ w_out.T  +  bias
    row/group weights with act_bits=4: exactly `reference.w4a4_linear` (int32 accumulation).
    tile/tensor weights (or act_bits != 4): fake-quant (see module docstring for why).
    """

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, weight_spec: QuantSpec = DEFAULT_W4_SPEC,
                    act_bits: int = 4, outlier_idx: torch.Tensor | None = None) -> "W4A4Linear":
        """Build from `linear` (weight (N, K)).

        Args:
            weight_spec: symmetric int quantizer for the regular weight columns, bits <= 4.
            act_bits: per-token symmetric activation bits, 2..8 (4 = the int4 path).
            outlier_idx: None or int64 (k,) distinct channel indices in [0, K), k < K.
        """
        _check_linear(linear)
        _check_spec(weight_spec, "weight_spec", max_bits=4, symmetric_only=True,
                    granularities=("tensor", "row", "group", "tile"))
        if isinstance(act_bits, bool) or not isinstance(act_bits, int) or not 2 <= act_bits <= 8:
            raise ValueError(f"act_bits must be an int in 2..8, got {act_bits!r}")
        k_in = linear.in_features
        w = linear.weight.detach().float()
        if outlier_idx is None:
            outlier_idx = torch.empty(0, dtype=torch.int64, device=w.device)
        check_tensor(outlier_idx, "outlier_idx", ndim=1, dtypes=(torch.int64,), nonempty=False)
        outlier_idx = outlier_idx.to(w.device)
        if outlier_idx.numel():
            if int(outlier_idx.min()) < 0 or int(outlier_idx.max()) >= k_in:
                raise ValueError(f"outlier_idx must lie in [0, {k_in}), got range "
                                 f"[{int(outlier_idx.min())}, {int(outlier_idx.max())}]")
            if torch.unique(outlier_idx).numel() != outlier_idx.numel():
                raise ValueError("outlier_idx has repeated channels")
        if outlier_idx.numel() >= k_in:
            raise ValueError(f"outlier_idx selects {outlier_idx.numel()} of {k_in} channels; "
                             "at least one must stay int4")
        outlier_idx = torch.sort(outlier_idx).values
        n_out = outlier_idx.numel()
        perm = (_outliers.outlier_permutation(k_in, outlier_idx).to(w.device) if n_out
                else torch.arange(k_in, device=w.device))
        m = cls(k_in, linear.out_features)
        m.act_bits = act_bits
        m.weight_layout = WEIGHT_LAYOUT_W4A4
        m.n_outliers = n_out
        m.k_regular = k_in - n_out
        m.register_buffer("perm", perm.contiguous())
        m.register_buffer("outlier_idx", outlier_idx.contiguous())
        w_perm = w[:, perm]
        m._store_int4_weight(w_perm[:, :m.k_regular], weight_spec)
        m.register_buffer("w_out", w_perm[:, m.k_regular:].to(torch.float16).contiguous())
        m._register_bias(linear)
        m.prepare_gather_index()
        return m

    def prepare_gather_index(self) -> None:
        """(Re)build ``gather_idx`` = int32 ``perm`` (non-persistent) from the current ``perm``;
        None without outliers (the kernels then read x in order)."""
        idx = self.perm.to(torch.int32).contiguous() if self.n_outliers else None
        self.register_buffer("gather_idx", idx, persistent=False)

    def _load_from_state_dict(self, *args, **kwargs):
        out = super()._load_from_state_dict(*args, **kwargs)
        if self._buffers.get("perm") is not None:
            self.prepare_gather_index()               # perm may have changed
        return out

    def _pack_codes(self, w_q: torch.Tensor) -> torch.Tensor:
        return quant.pack_int4_blocked(w_q, _W4A4_BLOCK_K)

    def _unpack(self) -> torch.Tensor:
        return quant.unpack_int4_blocked(self.w_packed, self.k_padded, _W4A4_BLOCK_K)

    def _gather_index(self, device: torch.device) -> torch.Tensor:
        """int32 (K,) ``perm``: act_quant reads the channels from their original positions."""
        if self._buffers.get("gather_idx") is None:    # a module built without it (old code)
            self.prepare_gather_index()
        return self.gather_idx                        # on perm's device, i.e. the module's

    @property
    def int_path(self) -> bool:
        """True when forward uses the integer reference (row/group weights, 4-bit activations)."""
        return self.act_bits == 4 and self.weight_spec.granularity in ("row", "group")

    @property
    def kernel_path(self) -> bool:
        """True when the Triton W4A4 kernel can run this layer: the integer path with per-row
        scales, or per-group scales whose group size is a multiple of the kernel's K block."""
        if not self.int_path:
            return False
        spec = self.weight_spec
        return spec.granularity == "row" or spec.group_size % _W4A4_BLOCK_K == 0

    def prequant_problem(self, norm) -> str | None:
        """Why this layer cannot take the payload of the `mixq.nn.QuantNorm` `norm` (as
        ``"does not ..."`` / ``"has ..."``), or None when it can (`mixq.nn.attach_consumers`)."""
        if not self.kernel_path:
            return "does not run the W4A4 kernel path (needs row/group weights, act_bits=4)"
        if norm.out_format != "int8":
            return f"reads int8 codes, the norm writes {norm.out_format!r}"
        if self.in_features != norm.hidden_size:
            return f"has in_features={self.in_features}, the norm K={norm.hidden_size}"
        if self.act_bits != norm.bits:
            return f"quantizes to {self.act_bits} bits, the norm to {norm.bits}"
        if not torch.equal(self.outlier_idx.cpu(), norm.outlier_idx.cpu()):
            return (f"has other outlier channels ({self.outlier_idx.numel()} vs "
                    f"{norm.outlier_idx.numel()} in the norm)")
        return None

    def _forward_kernel(self, x: torch.Tensor) -> torch.Tensor:
        """The same math on the Triton kernels, output in x.dtype (fp32 for fp64 inputs):
        M <= `W4A4_DECODE_MAX_M` tokens (off by default): one launch, `w4a4_decode_gemm`
        (quantization fused in); otherwise act_quant
        (per-token int4 codes + the fp16 outlier copy, gathered through ``perm``) then the W4A4
        GEMM with the outlier product fused; after a fused QuantNorm, its codes go straight to
        the GEMM. The three give the same result bit for bit."""
        from mixq.kernels.act_quant import act_quant
        from mixq.kernels.w4a4 import w4a4_gemm
        w_packed = self.w_packed                      # already the GEMM's blocked layout
        if x.dtype not in _KERNEL_OUT_DTYPES:          # fp64: the kernels read fp32
            x = x.float()
        pre = take_prequantized(x, self)     # payload of a fused QuantNorm (mixq.nn.norm), or None
        g = self.weight_spec.group_size if self.weight_spec.granularity == "group" else None
        if pre is None and x.shape[0] <= W4A4_DECODE_MAX_M:
            # decode: one kernel quantizes the few rows and multiplies (same result bit for bit)
            from mixq.kernels.w4a4_decode import w4a4_decode_gemm
            return w4a4_decode_gemm(
                x.contiguous(), w_packed, self.w_scale, n_outliers=self.n_outliers,
                gather_idx=self._gather_index(x.device) if self.n_outliers else None,
                w_out=self.w_out if self.n_outliers else None, bias=self.bias,
                group_size=g, bits=self.act_bits, out_dtype=x.dtype,
                validate=self._buffers_moved())
        if pre is not None:
            x_q, x_scale, x_out = pre
        else:
            # the kernel gathers the channels through perm (outliers last: no x[:, perm] copy)
            # and zero-pads the codes to the weight's Kb columns (zero codes leave absmax and
            # the dot unchanged): no tail step, no padding copy
            # (operands validated when the module was built or loaded: no per-call checks)
            x_q, x_scale, x_out = act_quant(
                x.contiguous(), n_outliers=self.n_outliers, out_format="int8",
                gather_idx=self._gather_index(x.device) if self.n_outliers else None,
                pad_to=2 * w_packed.shape[1], bits=self.act_bits, validate=False,
                out_dtype=self.w_out.dtype if self.n_outliers else torch.float16)
        return w4a4_gemm(x_q, x_scale, w_packed, self.w_scale, group_size=g,
                         x_out=x_out if self.n_outliers else None,
                         w_out=self.w_out if self.n_outliers else None, bias=self.bias,
                         out_dtype=x.dtype, validate=self._buffers_moved())

    def _buffers_moved(self) -> bool:
        """True when ``.to(dtype)`` changed the float buffers from what the build validated
        (then the GEMM checks its operands and names the problem)."""
        return (self.w_scale.dtype != torch.float16 and self.w_scale.dtype != torch.bfloat16) or \
            (self.n_outliers > 0 and self.w_out.dtype not in (torch.float16, torch.bfloat16))

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_path and self._wants_kernel(x, "w4a4"):
            return self._forward_kernel(x)
        if self.n_outliers:
            x = x[:, self.perm]
        x_reg = _pad_cols(x[:, :self.k_regular], self.k_padded)
        x_out = x[:, self.k_regular:].to(torch.float16) if self.n_outliers else None
        w_out = self.w_out if self.n_outliers else None
        if self.int_path:
            g = self.weight_spec.group_size if self.weight_spec.granularity == "group" else None
            return reference.w4a4_linear(x_reg, self._reference_w_q(), self.w_scale,
                                         group_size=g, x_out=x_out, w_out=w_out, bias=self.bias)
        x_q, x_scale = reference.quantize_per_token(x_reg, self.act_bits)
        y = (x_q.float() * x_scale.float()) @ self._dequantize(self._reference_w_q()).T
        if self.n_outliers:
            y = y + x_out.float() @ w_out.float().T
        return y if self.bias is None else y + self.bias.float()

    def weight_nbytes(self) -> int:
        """packed int4 N*ceil(Kp/2) + int4 scales + fp16 outlier weights N*k*2 + fp16 bias."""
        return self._int4_nbytes() + _nbytes(self.w_out, self.bias)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", weight={self.weight_spec.describe()}, "
                f"act_bits={self.act_bits}, n_outliers={self.n_outliers}")


class RotatedInputLinear(nn.Module):
    """``y = inner(x @ Q)``: a linear whose input gets an online orthogonal transform first.

    For methods that rotate a linear's weight (``W <- W Q``, `mixq.methods.rotation`) where the
    rotation of the input cannot be folded into the previous op. Buffers: ``rotation`` fp32
    (K, K). The product is computed in fp32; `inner` (a quantized module or nn.Linear) gets fp32
    input and the result is cast back to x.dtype.
    """

    def __init__(self, inner: nn.Module, rotation: torch.Tensor) -> None:
        super().__init__()
        k = int(inner.in_features)
        if tuple(rotation.shape) != (k, k):
            raise ValueError(f"rotation must be ({k}, {k}) for in_features={k}, "
                             f"got {tuple(rotation.shape)}")
        self.in_features, self.out_features = k, int(inner.out_features)
        self.inner = inner
        self.register_buffer("rotation", rotation.detach().float().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) float -> (..., N) in x.dtype."""
        y = self.inner(x.float() @ self.rotation.to(x.device))
        return y.to(x.dtype)


# ----------------------------------------------------------------------------- the builder
def _set_int4_weight(module: "W4A4Linear | W4A16Linear", qt: quant.QTensor, name: str) -> None:
    """Replace the RTN codes of a freshly built int4 module by a method's QTensor (same layout)."""
    if not isinstance(qt, quant.QTensor):
        raise TypeError(f"qweight of {name!r} must be a mixq.quant.QTensor, got {type(qt).__name__}")
    if qt.spec != module.weight_spec:
        raise ValueError(f"qweight of {name!r} uses {qt.spec.describe()} but the linear is "
                         f"quantized with {module.weight_spec.describe()}")
    n, kp = module.out_features, module.k_padded
    rows = qt.q.shape[0]
    tr = qt.spec.tile[0]
    pad_rows = math.ceil(n / tr) * tr if qt.spec.granularity == "tile" else n
    if qt.q.shape[1] != kp or rows not in (n, pad_rows):
        raise ValueError(f"qweight of {name!r}: q must have the regular_weight() layout "
                         f"({n} or {pad_rows}, {kp}), got {tuple(qt.q.shape)}")
    if tuple(qt.scale.shape) != tuple(module.w_scale.shape):
        raise ValueError(f"qweight of {name!r}: scale must have shape "
                         f"{tuple(module.w_scale.shape)}, got {tuple(qt.scale.shape)}")
    if (qt.zero is None) != (module.w_zero is None):
        raise ValueError(f"qweight of {name!r}: zero point presence does not match the spec")
    module.set_int4_codes(qt.q[:n], qt.scale, qt.zero)


def quantize_linear(linear: nn.Linear, mode: str = "w4a4", *,
                    weight_spec: QuantSpec | None = None, act_bits: int | None = None,
                    outlier_idx: torch.Tensor | None = None,
                    qweight: quant.QTensor | None = None,
                    name: str = "linear") -> QuantLinearBase:
    """The quantized module that replaces `linear` (weight (N, K)): the one builder, used by
    `mixq.quantize`, the MNIST course and the benchmarks.

    * mode "fp16" / "bf16": `FP16Linear` in that dtype.
    * mode "w8a8", or an 8-bit `weight_spec` (a layer override in w4a4/w4a16): `W8A8Linear`
      (int8 per-token activations; `outlier_idx` is ignored: int8 needs no FP16 channels).
    * mode "w4a16": `W4A16Linear` (weight-only int4; `outlier_idx` must be empty).
    * mode "w4a4": `W4A4Linear` (per-token `act_bits` activations, the FP16 `outlier_idx`
      channels).

    Args:
        linear: the float nn.Linear.
        mode: one of `mixq.config.MODES` (case-insensitive).
        weight_spec: weight QuantSpec; None = the mode's `mixq.config.default_specs` grid
            (int4 symmetric g128, int8 per row).
        act_bits: activation bits of W4A4 (2..8); None = the mode's default (4).
        outlier_idx: int64 (k,) FP16 input channels (W4A4), or None.
        qweight: a method's QTensor replacing the RTN codes of an int4 module; layout of
            `mixq.api.regular_weight` (the qweights convention of the methods).
        name: qualified name, for error messages.
    """
    mode = check_mode(mode)
    if mode in FLOAT_MODES:
        return FP16Linear.from_linear(
            linear, dtype=torch.float16 if mode == "fp16" else torch.bfloat16)
    w_default, a_default = default_specs(mode)
    spec = w_default if weight_spec is None else weight_spec
    n_out = 0 if outlier_idx is None else int(outlier_idx.numel())
    if mode == "w8a8" or spec.bits == 8:   # int8 has no FP16 outlier path: outliers dropped
        if qweight is not None:
            raise ValueError(f"{name}: W8A8 takes no method-quantized (int4) weights")
        return W8A8Linear.from_linear(linear, weight_spec=spec)
    if mode == "w4a16":
        if n_out:
            raise ValueError(f"{name}: weight-only W4A16 has no FP16 outlier channels "
                             f"(got {n_out})")
        module = W4A16Linear.from_linear(linear, weight_spec=spec)
    else:
        module = W4A4Linear.from_linear(linear, weight_spec=spec,
                                        act_bits=a_default.bits if act_bits is None else act_bits,
                                        outlier_idx=outlier_idx)
    if qweight is not None:
        _set_int4_weight(module, qweight, name)
    return module


# ----------------------------------------------------------------------------- helpers
def module_weight_nbytes(module: nn.Module) -> int:
    """Weight bytes of every linear in `module`: `weight_nbytes()` of quantized linears plus the
    weight and bias bytes of plain `nn.Linear`s (at their stored dtype)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    total = 0
    for m in module.modules():
        if isinstance(m, QuantLinearBase):
            total += m.weight_nbytes()
        elif isinstance(m, nn.Linear):
            total += _nbytes(m.weight, m.bias)
    return total


def module_memory_bytes(module: nn.Module) -> int:
    """Bytes `module` really holds: every parameter and buffer, persistent or not (kernel-layout
    and unpacked caches included), counted once per underlying storage (tied weights, views).

    Unlike `module_weight_nbytes` (the stored format), this is what a cache such as
    ``w_q_cache`` or ``w_kernel`` adds; a storage larger than its tensor (a view of a bigger
    buffer) counts in full, since all of it stays allocated.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    seen: set[tuple] = set()
    total = 0
    tensors = [t for m in module.modules()
               for t in (*m._parameters.values(), *m._buffers.values()) if t is not None]
    for t in tensors:
        if t.device.type == "meta":                 # shape only, no memory
            continue
        storage = t.untyped_storage()
        key = (t.device, storage.data_ptr(), storage.nbytes())
        if key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total
