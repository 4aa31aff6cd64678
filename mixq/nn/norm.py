"""`QuantNorm`: a norm that also quantizes its output once for the W4A4 linears reading it, and
the hand-off of that payload to them.

In a pre-norm decoder layer the hidden states h (bf16) go through a norm whose output feeds
several linears (Llama: q/k/v after input_layernorm, gate/up after post_attention_layernorm;
OPT: q/k/v after self_attn_layer_norm, fc1 after final_layer_norm). Unfused, every one of those
W4A4 linears re-reads the norm output and quantizes it again (`mixq.kernels.act_quant`). Fused,
`QuantNorm` runs one kernel (`mixq.kernels.norm_quant.norm_act_quant`) that writes the normal
bf16 output (the model code still gets a plain tensor) *and* the payload
``(x_q, x_scale, x_out)`` once; the consumers pick it up with `take_prequantized` and skip their
own act_quant. Outputs are bit-identical to the unfused path because the kernel quantizes the
rounded bf16 values it returns (see the kernel docstring). The math is
`mixq.reference.norm`.

Hand-off protocol (no change to Hugging Face model code)
--------------------------------------------------------
* `mixq.hf.norm_fusion.fuse_norm_quant(model)` swaps each pre-norm whose consumers are all W4A4
  linears with one shared outlier set for a `QuantNorm`, and links them (`attach_consumers`).
* `QuantNorm.forward` returns the normed tensor and remembers (weakly) which tensor it returned,
  its storage address and version counter, plus the payload and the consumers still to serve.
* ``take_prequantized(x, linear)`` (called by `W4A4Linear` before its own act_quant) returns
  the payload only if `linear` was attached to that norm, has not taken this payload yet, and
  `x` is that very output (or a contiguous reshape of it: same storage address, size, dtype and
  an unchanged version counter, i.e. not modified in place). Anything else gets None and the
  linear quantizes by itself, so the hand-off can only save work, never change a result.
  The payload is released once every consumer has taken it (else at the next forward).

A consumer says itself whether it can read a norm's payload (``linear.prequant_problem(norm)``,
which `mixq.nn.linear.W4A4Linear` defines), so this module needs no linear class.

Limits: under ``torch.compile`` the hand-off is off (QuantNorm returns the plain norm, linears
quantize themselves); a deep copy of a fused model keeps working but unfused (re-run
`fuse_norm_quant` on the copy); the model's final norm (before lm_head) is not fused.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

from mixq import outliers as _outliers
from mixq.reference.norm import NORM_DTYPES, check_norm_args, norm_reference
from mixq.validation import check_quant_args, check_tensor, hot_path

__all__ = ["QuantNorm", "attach_consumers", "relink_consumers", "take_prequantized"]

_IN_DTYPES = NORM_DTYPES
_LINK = "_mixq_prequant_norm"      # attribute of a consumer linear: its QuantNorm


# ----------------------------------------------------------------------------- the module
@dataclass
class _Handoff:
    """One forward's payload and how to recognize the tensor it belongs to."""

    ref: weakref.ref          # the returned tensor: alive => its storage address is not reused
    data_ptr: int
    numel: int
    dtype: torch.dtype
    version: int | None       # None for inference tensors (they track no version)
    payload: tuple
    pending: set              # ids of consumers that have not taken it yet


def _version(t: torch.Tensor) -> int | None:
    return None if t.is_inference() else t._version


class QuantNorm(nn.Module):
    """RMSNorm / LayerNorm that also quantizes its output for the W4A4 linears reading it.

    Buffers: ``weight`` (K,) (and ``bias`` (K,) for LayerNorm) as in the replaced norm, same
    state_dict keys; ``outlier_idx`` int64 (k,) sorted (not persistent: it belongs to the
    consumers). forward(h (..., K)) returns the norm output exactly as the replaced module
    (dtype: see `norm_reference`); when linked consumers exist and the kernel path runs, the
    payload ``(x_q int8 (M, Kq) or uint8 packed, x_scale fp16 (M, 1), x_out fp16 (M, k))`` of
    the output (flattened to M = prod(...) rows) is kept for `take_prequantized`.

    Attributes:
        use_kernels: None = the fused kernel for CUDA inputs on a capable GPU, True = always
            (CPU under TRITON_INTERPRET=1), False = never (plain norm, no payload).
    """

    use_kernels: bool | None = None

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                 kind: str = "rms", eps: float = 1e-6, outlier_idx: torch.Tensor | None = None,
                 bits: int = 4, out_format: str = "int8") -> None:
        super().__init__()
        check_tensor(weight, "weight", ndim=1, dtypes=_IN_DTYPES, finite=True)
        k = weight.shape[0]
        probe = torch.zeros(1, k, dtype=weight.dtype, device=weight.device)
        check_norm_args(probe, weight.contiguous(),
                        None if bias is None else bias.contiguous(), kind, eps, finite=True)
        check_quant_args(out_format, bits, 0)
        if outlier_idx is None:
            outlier_idx = torch.empty(0, dtype=torch.int64)
        check_tensor(outlier_idx, "outlier_idx", ndim=1, dtypes=(torch.int64, torch.int32),
                     nonempty=False)
        idx = torch.sort(outlier_idx.to(device=weight.device, dtype=torch.int64)).values
        perm = _outliers.outlier_permutation(k, idx)     # validates range / distinct
        if idx.numel() >= k:
            raise ValueError(f"outlier_idx selects {idx.numel()} of {k} channels; "
                             "at least one must stay int4")
        self.kind, self.eps, self.bits, self.out_format = kind, float(eps), bits, out_format
        self.hidden_size = k
        self.register_buffer("weight", weight.detach().clone().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone().contiguous())
        self.register_buffer("outlier_idx", idx, persistent=False)
        # the kernel's gather order [int4 part | outliers], int32, validated once here
        self.register_buffer("gather_idx", perm.to(torch.int32) if idx.numel() else None,
                             persistent=False)
        self._consumer_ids: set[int] = set()
        self._handoff: _Handoff | None = None

    @classmethod
    def from_norm(cls, norm: nn.Module, *, outlier_idx: torch.Tensor | None = None,
                  bits: int = 4, out_format: str = "int8") -> "QuantNorm":
        """Build from an HF RMSNorm (``weight`` (K,), ``variance_epsilon``: Llama, Mistral,
        Qwen2) or a `torch.nn.LayerNorm` over the last dim (OPT)."""
        if isinstance(norm, nn.LayerNorm):
            if len(norm.normalized_shape) != 1:
                raise ValueError(f"LayerNorm must normalize the last dim only, got "
                                 f"normalized_shape={tuple(norm.normalized_shape)}")
            k = norm.normalized_shape[0]
            w = norm.weight if norm.weight is not None else torch.ones(k)
            return cls(w.detach(), None if norm.bias is None else norm.bias.detach(), kind="layer",
                       eps=norm.eps, outlier_idx=outlier_idx, bits=bits, out_format=out_format)
        w = getattr(norm, "weight", None)
        if isinstance(w, torch.Tensor) and hasattr(norm, "variance_epsilon"):
            return cls(w.detach(), kind="rms", eps=norm.variance_epsilon, outlier_idx=outlier_idx,
                       bits=bits, out_format=out_format)
        raise TypeError(f"norm must be torch.nn.LayerNorm or an HF RMSNorm (weight, "
                        f"variance_epsilon), got {type(norm).__name__}")

    def _fused(self, x: torch.Tensor) -> bool:
        if not self._consumer_ids or torch.compiler.is_compiling() or \
                (x.requires_grad and torch.is_grad_enabled()):   # the kernel has no backward
            return False
        if self.use_kernels is False or (self.use_kernels is None and not x.is_cuda):
            return False
        from mixq.kernels._triton import fallback_to_reference
        return not fallback_to_reference(x, "norm_act_quant")

    @hot_path
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Norm of `hidden_states` (..., K) float; see the class docstring."""
        check_tensor(hidden_states, "hidden_states", dtypes=_IN_DTYPES, device=self.weight.device)
        if hidden_states.dim() < 1 or hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden_states must have shape (..., {self.hidden_size}), "
                             f"got {tuple(hidden_states.shape)}")
        self._handoff = None
        if not self._fused(hidden_states):
            return norm_reference(hidden_states, self.weight, self.bias, kind=self.kind,
                                  eps=self.eps)
        from mixq.kernels.norm_quant import norm_act_quant_prepared
        x = hidden_states.reshape(-1, self.hidden_size).contiguous()
        *payload, h = norm_act_quant_prepared(
            x, self.weight, self.bias, self.gather_idx, int(self.outlier_idx.numel()),
            kind=self.kind, eps=self.eps, out_format=self.out_format, bits=self.bits)
        out = h.reshape(hidden_states.shape)
        self._handoff = _Handoff(weakref.ref(out), out.data_ptr(), out.numel(), out.dtype,
                                 _version(out), tuple(payload), set(self._consumer_ids))
        return out

    def _take(self, x: torch.Tensor, linear: nn.Module):
        ho = self._handoff
        if ho is None or id(linear) not in ho.pending:
            return None
        if (ho.ref() is None or x.data_ptr() != ho.data_ptr or x.numel() != ho.numel
                or x.dtype != ho.dtype or not x.is_contiguous() or _version(x) != ho.version):
            return None
        ho.pending.discard(id(linear))
        if not ho.pending:
            self._handoff = None
        x_q, x_scale, x_out = ho.payload
        pad = int(getattr(linear, "k_padded", x_q.shape[1])) - x_q.shape[1]
        if pad > 0 and self.out_format == "int8":   # zero columns: codes 0, as act_quant gives
            x_q = torch.nn.functional.pad(x_q, (0, pad))
        return x_q, x_scale, x_out

    def extra_repr(self) -> str:
        return (f"{self.hidden_size}, kind={self.kind}, eps={self.eps}, bits={self.bits}, "
                f"n_outliers={self.outlier_idx.numel()}, out_format={self.out_format}, "
                f"consumers={len(self._consumer_ids)}")



# ----------------------------------------------------------------------------- hand-off
def _consumer_problem(norm: QuantNorm, linear: nn.Module) -> str | None:
    """Why `linear` cannot read `norm`'s payload, or None (asks ``linear.prequant_problem``)."""
    ask = getattr(linear, "prequant_problem", None)
    if ask is None:
        return f"is {type(linear).__name__}, not W4A4Linear"
    return ask(norm)


def attach_consumers(norm: QuantNorm, linears) -> None:
    """Link W4A4 linears to `norm` so that they take its payload (`take_prequantized`).

    Every linear must be a `mixq.nn.W4A4Linear` on the kernel path with the norm's K, bits,
    int8 format and exactly its (sorted) ``outlier_idx``. Raises ValueError naming the first
    mismatch, TypeError for a non-QuantNorm `norm`.
    """
    if not isinstance(norm, QuantNorm):
        raise TypeError(f"norm must be a mixq.nn.QuantNorm, got {type(norm).__name__}")
    linears = list(linears)
    for i, lin in enumerate(linears):
        problem = _consumer_problem(norm, lin)
        if problem:
            raise ValueError(f"linears[{i}] cannot take the norm's payload: it {problem}")
    for lin in linears:
        object.__setattr__(lin, _LINK, norm)     # not a registered submodule
        norm._consumer_ids.add(id(lin))


def relink_consumers(norm: QuantNorm, old, new: nn.Module) -> None:
    """Hand `norm`'s payload to `new` instead of the linears `old` (those linked to it), e.g.
    when `mixq.nn.stacked.StackedLinear` replaces q/k/v by one stacked module. Linears of
    `old` that were not linked are ignored; `new` is attached only if one of them was (and is
    checked as by `attach_consumers`)."""
    if not isinstance(norm, QuantNorm):
        raise TypeError(f"norm must be a mixq.nn.QuantNorm, got {type(norm).__name__}")
    linked = [lin for lin in old if lin.__dict__.get(_LINK) is norm]
    if not linked:
        return
    attach_consumers(norm, [new])
    for lin in linked:
        norm._consumer_ids.discard(id(lin))
        lin.__dict__.pop(_LINK, None)


def take_prequantized(x: torch.Tensor, linear: nn.Module):
    """The payload ``(x_q, x_scale, x_out)`` a fused norm computed for input `x` of `linear`,
    or None (then the linear quantizes `x` itself).

    Args:
        x: the linear's input, (..., K) or its (M, K) reshape.
        linear: a W4A4Linear linked by `attach_consumers`.
    Returns:
        None, or x_q int8 (M, Kp) (zero-padded to ``linear.k_padded``), x_scale fp16 (M, 1),
        x_out fp16 (M, k): equal to what ``act_quant`` gives on the linear's permuted input.
    """
    norm = linear.__dict__.get(_LINK)
    if norm is None or torch.compiler.is_compiling():
        return None
    return norm._take(x, linear)

