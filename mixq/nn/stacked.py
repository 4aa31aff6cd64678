"""`StackedLinear`: quantized linears that read one input, computed as one GEMM.

In a Llama decoder layer q/k/v read the same normed hidden states, and so do gate/up. Three
(two) GEMM launches over the same activations, each with its own activation quantization, do
the work of one GEMM whose weight is the members' weights stacked along N::

    W = [W_0; W_1; ...]                 (sum N_i, K)   rows of every member, in order
    y = layer_W(x)                      (..., sum N_i) one act-quant + one GEMM (one launch each)
    y_i = y[..., off_i : off_i + N_i]   views, no copy

Every output element is computed by the same per-row math as in the member alone (per-token
activation quantization is shared; scales, zeros, outlier weights and bias are per output row),
so the integer parts are equal; the float epilogue is the same sequence of operations (equal
bit for bit on the reference path; on the kernels, up to the order of fp32 sums where another
tile configuration is tuned for the larger N).

How the model code calls it (no change to Hugging Face code)
------------------------------------------------------------
The members are replaced by `StackedPart` modules (same names, same ``in_features`` /
``out_features``). The model still calls ``q_proj(x)``, ``k_proj(x)``, ``v_proj(x)``: the first
part that sees a new input tensor ``x`` runs the stacked GEMM and keeps the split outputs; the
other parts called with *that very tensor object* (``x is`` the kept input, in eager also the
same version counter: not modified in place) return their slice, and once every part has taken
its slice the stack drops its references. Any other call order or input just recomputes, so the
sharing can only save work, never change a result. Under ``torch.compile`` the identity test is
resolved while tracing (no guard, no graph break): the graph holds one GEMM per stack.

State dict and checkpoints: a `StackedPart` saves and loads its member's tensors under the
member's names (slices of the stacked buffers), and the stacked module itself saves nothing, so
``state_dict()`` keys and values are those of the unstacked model and `mixq.io` checkpoints keep
the unstacked layout (`StackedPart.as_linear` gives the member module back, as views).

Public API: `stack_problem(linears)`, `StackedLinear(linears)`, `StackedPart`, `ROW_BUFFERS`.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mixq.nn.linear import (DERIVED_BUFFERS, FP16Linear, QuantLinearBase, W4A4Linear, W4A16Linear,
                            W8A8Linear)
from mixq.nn.norm import _version

__all__ = ["ROW_BUFFERS", "StackedLinear", "StackedPart", "stack_problem"]

#: Buffers indexed by output row (first dim N), per stackable class: concatenated along N.
#: Every other persistent buffer (W4A4: ``perm``, ``outlier_idx``) must be equal in all members
#: and is kept once.
ROW_BUFFERS: dict[type, tuple[str, ...]] = {
    FP16Linear: ("weight", "bias"),
    W8A8Linear: ("w_q", "w_scale", "bias"),
    W4A16Linear: ("w_packed", "w_scale", "w_zero", "bias"),
    W4A4Linear: ("w_packed", "w_scale", "w_zero", "w_out", "bias"),
}


def _public_attrs(m: nn.Module) -> dict:
    """What defines a quantized module besides its tensors (what `mixq.io` saves)."""
    return {k: v for k, v in vars(m).items() if not k.startswith("_") and k != "training"}


def _persistent(m: nn.Module) -> list[str]:
    return [k for k in m._buffers if k not in m._non_persistent_buffers_set]


def stack_problem(linears: Sequence[nn.Module]) -> str | None:
    """Why `linears` cannot be stacked into one `StackedLinear`, or None when they can.

    They can when there are at least two, all of one class of `ROW_BUFFERS`, with equal
    ``in_features`` and equal attributes besides ``out_features`` (weight grid, activation
    bits, outlier count, padding), per-row or per-group weight scales (a tile or tensor scale
    is not a per-row quantity), the same buffers present (bias in all or none) and equal shared
    buffers (the same outlier channels).
    """
    linears = list(linears)
    if len(linears) < 2:
        return f"needs at least two linears, got {len(linears)}"
    first = linears[0]
    cls = type(first)
    if cls not in ROW_BUFFERS:
        return f"{cls.__name__} cannot be stacked (stackable: " \
               f"{', '.join(c.__name__ for c in ROW_BUFFERS)})"
    spec = getattr(first, "weight_spec", None)
    if spec is not None and spec.granularity not in ("row", "group"):
        return f"has {spec.granularity!r} weight scales (only per-row or per-group scales stack)"
    want = {k: v for k, v in _public_attrs(first).items() if k != "out_features"}
    rows = ROW_BUFFERS[cls]
    for i, m in enumerate(linears[1:], 1):
        if type(m) is not cls:
            return f"linears[{i}] is {type(m).__name__}, linears[0] is {cls.__name__}"
        have = {k: v for k, v in _public_attrs(m).items() if k != "out_features"}
        if have != want:
            diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
            return f"linears[{i}] differs from linears[0] in {', '.join(diff)}"
        if _persistent(m) != _persistent(first):
            return f"linears[{i}] holds buffers {_persistent(m)}, linears[0] {_persistent(first)}"
        for name in _persistent(first):
            a, b = first._buffers[name], m._buffers[name]
            if (a is None) != (b is None):
                return f"linears[{i}] {'has' if b is not None else 'lacks'} {name}, linears[0] not"
            if a is None:
                continue
            if a.device != b.device or a.dtype != b.dtype:
                return f"linears[{i}].{name} is {b.dtype} on {b.device}, linears[0] {a.dtype} " \
                       f"on {a.device}"
            if name in rows:
                if a.shape[1:] != b.shape[1:]:
                    return f"linears[{i}].{name} has shape {tuple(b.shape)}, linears[0] " \
                           f"{tuple(a.shape)}"
            elif a.shape != b.shape or not torch.equal(a, b):
                return f"linears[{i}] has another {name} than linears[0] (shared by a stack)"
    return None


def _empty_like(template: QuantLinearBase, out_features: int) -> QuantLinearBase:
    """A module of `template`'s class with its attributes, `out_features` rows and no tensors."""
    m = type(template).__new__(type(template))
    nn.Module.__init__(m)
    for k, v in _public_attrs(template).items():
        setattr(m, k, v)
    m.out_features = int(out_features)
    return m


def _stacked_module(linears: list[QuantLinearBase]) -> QuantLinearBase:
    """A module of the members' class whose row buffers are theirs concatenated along N.

    Its buffers are all non-persistent: the parts save and load them (`StackedPart`)."""
    first = linears[0]
    fused = _empty_like(first, sum(int(m.out_features) for m in linears))
    rows = ROW_BUFFERS[type(first)]
    for name in _persistent(first):
        t = first._buffers[name]
        if t is not None and name in rows:
            t = torch.cat([m._buffers[name] for m in linears]).contiguous()
        fused.register_buffer(name, t, persistent=False)
    if isinstance(fused, W4A4Linear):
        fused.prepare_gather_index()
    return fused


class StackedLinear(nn.Module):
    """Several quantized linears reading one input, as one module of their class (``fused``).

    Built from the members (validated by `stack_problem`; ValueError naming the mismatch).
    Attributes: ``fused`` (the stacked module, (sum N_i, K)), ``splits`` (N_i per member),
    ``member_names`` (names given by the caller, for reprs and reports).
    forward(x (..., K)) -> tuple of (..., N_i) views of one output, in member order.
    `output(x, i)` is what `StackedPart` i calls (see the module docstring for the sharing).
    The weights are held once: the members are not referenced after construction.
    """

    def __init__(self, linears: Sequence[QuantLinearBase], names: Sequence[str] | None = None
                 ) -> None:
        super().__init__()
        linears = list(linears)
        problem = stack_problem(linears)
        if problem:
            raise ValueError(f"cannot stack these linears: {problem}")
        self.fused = _stacked_module(linears)
        self.splits = tuple(int(m.out_features) for m in linears)
        self.member_names = tuple(names) if names is not None else \
            tuple(str(i) for i in range(len(linears)))
        if len(self.member_names) != len(linears):
            raise ValueError(f"names has {len(self.member_names)} entries for {len(linears)} "
                             "linears")
        self._buffer_names = tuple(_persistent(linears[0]))
        self._key: torch.Tensor | None = None
        self._key_version: int | None = None
        self._outs: tuple | None = None
        self._pending: tuple[int, ...] = ()

    @property
    def in_features(self) -> int:
        return int(self.fused.in_features)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """All member outputs of `x`, (..., N_i) each (views of one (..., sum N_i) output)."""
        return self.fused(x).split(self.splits, dim=-1)

    def _same_input(self, x: torch.Tensor) -> bool:
        if self._key is not x:
            return False
        if torch.compiler.is_compiling():
            return True                           # traced: identity is all there is
        return _version(x) == self._key_version   # eager: not modified in place since

    def output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Member `index`'s output for `x`: the kept slice when the stacked GEMM already ran on
        this very `x` and member `index` has not taken it yet, else a new stacked GEMM."""
        if not (self._same_input(x) and index in self._pending):
            self._outs = self.forward(x)
            self._key = x
            self._key_version = None if torch.compiler.is_compiling() else _version(x)
            self._pending = tuple(range(len(self.splits)))
        out = self._outs[index]
        self._pending = tuple(i for i in self._pending if i != index)
        if not self._pending:                     # every member served: drop the references
            self._key, self._outs, self._key_version = None, None, None
        return out

    def extra_repr(self) -> str:
        return f"members={self.member_names}, splits={self.splits}"


class StackedPart(nn.Module):
    """Member `index` of a `StackedLinear`, in the member's place (same call, same shapes).

    Holds no tensors: forward(x) = ``stack.output(x, index)``; ``state_dict`` / ``load_state_dict``
    see the member's buffers under their own names (slices of the stacked ones), so checkpoints
    keep the unstacked layout. The stack is referenced, not registered (it is registered once,
    beside the parts, by whoever built it: `mixq.hf.projection_fusion.fuse_projections`).
    """

    def __init__(self, stack: StackedLinear, index: int) -> None:
        super().__init__()
        if not isinstance(stack, StackedLinear):
            raise TypeError(f"stack must be a StackedLinear, got {type(stack).__name__}")
        if not 0 <= index < len(stack.splits):
            raise ValueError(f"index must be in [0, {len(stack.splits)}), got {index}")
        object.__setattr__(self, "stack", stack)
        self.index = int(index)
        self.in_features = stack.in_features
        self.out_features = stack.splits[index]
        self.row_offset = sum(stack.splits[:index])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., K) -> (..., N_index), as the member would (see `StackedLinear.output`)."""
        return self.stack.output(x, self.index)

    def member_buffer(self, name: str) -> torch.Tensor | None:
        """The member's buffer `name`: its rows of a row buffer (a view), else the shared one."""
        t = self.stack.fused._buffers[name]
        if t is None or name not in ROW_BUFFERS[type(self.stack.fused)]:
            return t
        return t.narrow(0, self.row_offset, self.out_features)

    def as_linear(self) -> QuantLinearBase:
        """The member as a module of its class whose buffers are views of the stacked ones
        (no copy; for saving and inspection: writing into it writes into the stack)."""
        m = _empty_like(self.stack.fused, self.out_features)
        for name in self.stack._buffer_names:
            m.register_buffer(name, self.member_buffer(name))
        if isinstance(m, W4A4Linear):
            m.prepare_gather_index()
        return m

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for name in self.stack._buffer_names:
            t = self.member_buffer(name)
            if t is not None:
                destination[prefix + name] = t if keep_vars else t.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        rows = ROW_BUFFERS[type(self.stack.fused)]
        names = self.stack._buffer_names
        for name in names:
            t = self.member_buffer(name)
            key = prefix + name
            if t is None:
                continue
            if key not in state_dict:
                missing_keys.append(key)
                continue
            v = state_dict[key]
            if tuple(v.shape) != tuple(t.shape):
                error_msgs.append(f"size mismatch for {key}: copying a param with shape "
                                  f"{tuple(v.shape)}, the stacked model has {tuple(t.shape)}")
            elif name in rows:
                with torch.no_grad():
                    t.copy_(v)
            elif not torch.equal(v.to(t.device, t.dtype), t):
                error_msgs.append(f"{key}: the stacked linears {self.stack.member_names} share "
                                  f"one {name}; a different one cannot be loaded into one member "
                                  "(load into the unstacked model)")
        for name in DERIVED_BUFFERS:               # caches built from the old codes are stale
            self.stack.fused._buffers.pop(name, None)
        if strict:
            for key in state_dict:
                if key.startswith(prefix) and "." not in key[len(prefix):] and \
                        key[len(prefix):] not in names:
                    unexpected_keys.append(key)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"part {self.index} of {type(self.stack.fused).__name__} "
                f"{self.stack.member_names}")
