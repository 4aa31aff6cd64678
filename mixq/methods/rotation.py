"""Hadamard rotation (QuaRot-style): spread activation outliers over all channels.

Ashkboos et al., "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs", NeurIPS 2024 (and
Chee et al., QuIP, 2023). For an orthogonal Q (Q Q^T = I)::

    x W^T = (x Q) (W Q)^T

A Hadamard Q mixes every input channel into every output channel with equal weight, so one
outlier channel of magnitude a becomes K channels of magnitude ~a / sqrt(K): the per-token
absmax drops and 4-bit activation quantization works (the weights get smoother too).

What this layer-local implementation does
-----------------------------------------
* ``attn_out`` (o after v) -- **folded, free**: a per-head Hadamard H_hd (head_dim) is applied
  to v_proj's output rows (``W_v[head] <- H^T W_v[head]``, bias too) and to o_proj's input
  columns (``W_o[:, head] <- W_o[:, head] H``). Attention mixes tokens, not channels, so
  ``softmax(.) (V H) = (softmax(.) V) H``; with GQA every q head reading a kv head gets the same H.
* ``attn_in`` / ``mlp_in`` (after an RMSNorm/LayerNorm) -- the norm's weight (and bias) is folded
  into the linears (`fold_norm_into_linears`), then ``W <- W Q`` with Q = `hadamard(K)`, and
  ``ctx.input_transforms[name] = Q`` asks the module for an **online** rotation ``x -> x Q``.
  QuaRot makes this one free by rotating the whole residual stream (embeddings, every o/down
  output and lm_head, so norms see ``h Q``): a model-level transform, NOT done here.
* ``mlp_out`` (down after SwiGLU, or OPT fc2 after ReLU) -- online only (the elementwise gate
  does not commute with a rotation); QuaRot also uses an online Hadamard here.
* Not done: the residual-stream rotation, the KV-cache / query rotations (QuaRot's K/V quant).
Set ``online=False`` to apply only the free part.

Hadamard matrices (`hadamard`)
------------------------------
K = 2^a: Sylvester's construction ``H_{2n} = [[H, H], [H, -H]] / sqrt(2)``. Other K = 2^a * m
(m odd, e.g. 576 = 9 * 64, 172 = 43 * 4): **fallback** ``Q = R_m kron H_{2^a}`` with R_m a random
orthogonal m x m matrix (QR of a Gaussian with a fixed seed, signs fixed by diag(R) > 0): exactly
orthogonal and dense (it still mixes every channel), but not a fast Walsh-Hadamard transform.
With ``random_signs`` the result is multiplied on the left by a random +-1 diagonal (QuaRot's
randomized Hadamard), seeded.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mixq.methods.base import (LayerContext, _check_group_free, _scale_stats, _unique_stats,
                               check_choice, check_int, fold_norm_into_linears, head_layout)
from mixq.methods.smoothquant import GROUP_KINDS

__all__ = ["Rotation", "hadamard", "rotate_stats"]


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def hadamard(n: int, *, seed: int = 0, random_signs: bool = False) -> torch.Tensor:
    """Orthogonal (n, n) float32 mixing matrix: Sylvester Hadamard for powers of two, else the
    documented fallback ``R_m kron H_{2^a}`` (module docstring).

    Args:
        n: size >= 1. seed: seed of the random parts. random_signs: left-multiply by diag(+-1).
    """
    check_int(n, "n", 1)
    a = (n & -n)                       # largest power of two dividing n
    m = n // a
    q = _sylvester(a)
    g = torch.Generator().manual_seed(seed)
    if m > 1:
        r, tri = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
        r = r * torch.sign(torch.diagonal(tri))[None, :]
        q = torch.kron(r.contiguous(), q.contiguous())
    if random_signs:
        q = (torch.randint(0, 2, (n,), generator=g).double() * 2 - 1)[:, None] * q
    return q.float()


def rotate_stats(ctx: LayerContext, group, q: torch.Tensor) -> None:
    """Stats of the inputs x Q: inputs @ Q, hessian (and sink_hessian) Q^T H Q; absmax / mean_abs / std recomputed
    from the stored input rows (left as they were when no rows are stored)."""
    for st in _unique_stats(ctx, group):
        for name in ("hessian", "sink_hessian"):
            h = getattr(st, name, None)
            if h is not None:
                qd = q.to(h.device).double()
                setattr(st, name, (qd.T @ h.double() @ qd).float())
        if st.inputs is not None:
            st.inputs = (st.inputs.double() @ q.to(st.inputs.device).double()).float()
            st.absmax = st.inputs.abs().amax(0)
            st.mean_abs = st.inputs.abs().mean(0)
            st.std = st.inputs.std(0)


def _block_diag(h: torch.Tensor, reps: int) -> torch.Tensor:
    return torch.block_diag(*([h] * reps))


@dataclass(frozen=True)
class Rotation:
    """Hadamard rotation of the chosen groups (see module docstring).

    Args:
        online: also rotate groups that need an online ``x -> x Q`` (norm groups, mlp_out).
        kinds: group kinds to rotate. seed: seed of the fallback / random signs.
        random_signs: randomized Hadamard (QuaRot).
    """

    online: bool = True
    kinds: tuple[str, ...] = GROUP_KINDS
    seed: int = 0
    random_signs: bool = False

    def __post_init__(self) -> None:
        for name in ("online", "random_signs"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"Rotation.{name} must be a bool, got {getattr(self, name)!r}")
        if not isinstance(self.kinds, tuple) or not self.kinds:
            raise ValueError(f"Rotation.kinds must be a non-empty tuple, got {self.kinds!r}")
        for kd in self.kinds:
            check_choice(kd, "Rotation.kinds item", GROUP_KINDS)
        check_int(self.seed, "Rotation.seed", 0)

    def apply(self, ctx: LayerContext) -> None:
        for g in ctx.groups:
            if g.kind not in self.kinds:
                continue
            _check_group_free(ctx, g)
            k = g.linears[0].in_features
            lay = head_layout(ctx, g)
            if lay is not None and lay[0]:
                self._rotate_heads(ctx, g, *lay)
            elif self.online:
                if any(n in ctx.input_transforms for n in g.names):
                    raise ValueError(f"group {g.kind!r} is already rotated")
                if g.prev_norm is not None:
                    gamma = g.prev_norm.weight.detach().double().clone()
                    fold_norm_into_linears(g)
                    _scale_stats(ctx, g, torch.where(gamma == 0, torch.ones_like(gamma), gamma))  # x / gamma
                q = hadamard(k, seed=self.seed, random_signs=self.random_signs)
                with torch.no_grad():
                    for n, lin in zip(g.names, g.linears):
                        lin.weight.copy_((lin.weight.double() @ q.to(lin.weight.device).double()).to(lin.weight.dtype))
                        ctx.input_transforms[n] = q
                rotate_stats(ctx, g, q)

    def _rotate_heads(self, ctx: LayerContext, g, hd: int, n_rep: int) -> None:
        h = hadamard(hd, seed=self.seed, random_signs=self.random_signs).double()
        v = g.prev_linear
        k = g.linears[0].in_features
        h = h.to(v.weight.device)
        bv = _block_diag(h, v.out_features // hd)
        bo = _block_diag(h, k // hd)
        with torch.no_grad():
            v.weight.copy_((bv.T @ v.weight.double()).to(v.weight.dtype))
            if v.bias is not None:
                v.bias.copy_((v.bias.double() @ bv).to(v.bias.dtype))
            for lin in g.linears:
                lin.weight.copy_((lin.weight.double() @ bo).to(lin.weight.dtype))
        rotate_stats(ctx, g, bo.float())
