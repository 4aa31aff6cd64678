"""A tiny Llama-shaped decoder layer with planted outlier channels, to test and demo methods.

LLM activations carry a few input channels 20-100x larger than the rest (LLM.int8(), SmoothQuant).
`SyntheticLayer` reproduces that in every group of linears:

* attn_in / mlp_in (q,k,v / gate,up after an RMSNorm): the residual input ``h`` has planted
  channels ``outlier_scale`` x larger (they survive the norm, as LLM "massive activations" do);
* attn_out (o after v): v_proj rows of the planted channels (per kv head) are larger;
* mlp_out (down after silu(gate) * up): up_proj rows of planted channels are larger.

Attribute names follow HF Llama (``self_attn.q_proj`` ...), so qualified names and
`llama_groups` match `mixq.models`' LinearGroups. `collect_stats` is a small stand-in for
`mixq.calibrate` on one layer; `simulate` evaluates every linear as its quantized module would.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from mixq.methods.base import LayerContext, LinearGroup, LinearStats, float_output, quantized_output
from mixq.quant import rel_fro_error

__all__ = ["RMSNorm", "SyntheticLayer", "llama_groups", "collect_stats", "make_inputs",
           "make_context", "SimpleConfig", "capture_outputs", "quantized_outputs", "layer_errors",
           "run_methods"]


class RMSNorm(nn.Module):
    """``y = x / sqrt(mean(x^2) + eps) * weight`` over the last dim (Llama's norm)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class _Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int) -> None:
        super().__init__()
        self.head_dim = dim // n_heads
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        kv = n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, kv, bias=False)
        self.v_proj = nn.Linear(dim, kv, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        hd, rep = self.head_dim, self.n_heads // self.n_kv_heads
        q = self.q_proj(x).view(b, t, self.n_heads, hd).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, hd).transpose(1, 2).repeat_interleave(rep, 1)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, hd).transpose(1, 2).repeat_interleave(rep, 1)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        att = att.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        return self.o_proj((att @ v).transpose(1, 2).reshape(b, t, -1))


class _MLP(nn.Module):
    def __init__(self, dim: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter, bias=False)
        self.up_proj = nn.Linear(dim, inter, bias=False)
        self.down_proj = nn.Linear(inter, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class SyntheticLayer(nn.Module):
    """Llama-like pre-norm decoder layer (GQA attention + SwiGLU MLP) with planted outliers.

    Args:
        dim: hidden size (divisible by n_heads). inter: MLP width. n_heads, n_kv_heads: heads.
        n_outliers: planted channels per group input. outlier_scale: their magnitude factor.
        seed: generator seed for the weights and the planted channels.
    Attributes:
        outlier_channels: dict group kind -> int64 planted input channels.
        h_scale: (dim,) per-channel std of the residual input used by `make_inputs`.
    """

    def __init__(self, dim: int = 96, inter: int = 172, n_heads: int = 6, n_kv_heads: int = 2,
                 n_outliers: int = 3, outlier_scale: float = 30.0, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.input_layernorm = RMSNorm(dim)
        self.self_attn = _Attention(dim, n_heads, n_kv_heads)
        self.post_attention_layernorm = RMSNorm(dim)
        self.mlp = _MLP(dim, inter)
        with torch.no_grad():
            for lin in (self.self_attn.q_proj, self.self_attn.k_proj, self.self_attn.v_proj,
                        self.self_attn.o_proj, self.mlp.gate_proj, self.mlp.up_proj, self.mlp.down_proj):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / math.sqrt(lin.in_features))
            pick = lambda n: torch.randperm(n, generator=g)[:n_outliers].sort().values  # noqa: E731
            self.outlier_channels = {"residual": pick(dim), "mlp_out": pick(inter)}
            hd = self.self_attn.head_dim
            kv_rows = pick(n_kv_heads * hd)
            self.outlier_channels["v_rows"] = kv_rows
            self.mix = torch.randn(max(1, dim // 4), dim, generator=g) / math.sqrt(max(1, dim // 4))
            self.h_scale = torch.ones(dim)
            self.h_scale[self.outlier_channels["residual"]] = outlier_scale
            for norm in (self.input_layernorm, self.post_attention_layernorm):
                norm.weight.copy_(1.0 + 0.1 * torch.randn(dim, generator=g))
            self.self_attn.v_proj.weight[kv_rows] *= outlier_scale
            self.mlp.up_proj.weight[self.outlier_channels["mlp_out"]] *= outlier_scale

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h))
        return h + self.mlp(self.post_attention_layernorm(h))


def make_inputs(layer: SyntheticLayer, batch: int, seqlen: int, seed: int) -> torch.Tensor:
    """Residual-stream input (batch, seqlen, dim) fp32 with correlated channels, like real
    hidden states: ``h = (z A + 0.5 e) * h_scale`` with z ~ N(0, I_{dim/4}), e ~ N(0, I), a fixed
    mixing A (from the layer) and the planted channels scaled by ``h_scale``."""
    g = torch.Generator().manual_seed(seed)
    d = layer.h_scale.shape[0]
    z = torch.randn(batch, seqlen, layer.mix.shape[0], generator=g)
    return (z @ layer.mix + 0.5 * torch.randn(batch, seqlen, d, generator=g)) * layer.h_scale


def llama_groups(layer: nn.Module) -> list:
    """The four LinearGroups of a Llama-style layer (as mixq.models' Llama adapter builds them)."""
    a, m = layer.self_attn, layer.mlp
    return [
        LinearGroup("attn_in", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                    (a.q_proj, a.k_proj, a.v_proj), layer.input_layernorm, None),
        LinearGroup("attn_out", ("self_attn.o_proj",), (a.o_proj,), None, a.v_proj),
        LinearGroup("mlp_in", ("mlp.gate_proj", "mlp.up_proj"), (m.gate_proj, m.up_proj),
                    layer.post_attention_layernorm, None),
        LinearGroup("mlp_out", ("mlp.down_proj",), (m.down_proj,), None, m.up_proj),
    ]


def capture_inputs(layer: nn.Module, groups: list, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Input rows (M, K) fp32 of every grouped linear when `layer(x)` runs."""
    out, handles = {}, []
    for g in groups:
        for n, lin in zip(g.names, g.linears):
            handles.append(lin.register_forward_hook(
                lambda mod, inp, _o, n=n: out.__setitem__(n, inp[0].detach().reshape(-1, inp[0].shape[-1]).float())))
    try:
        with torch.no_grad():
            layer(x)
    finally:
        for h in handles:
            h.remove()
    return out


def collect_stats(layer: nn.Module, groups: list, x: torch.Tensor, *,
                  hessian: bool = True) -> dict:
    """LinearStats of each grouped linear's input on `x` (all rows kept as ``inputs``)."""
    stats = {}
    for n, inp in capture_inputs(layer, groups, x).items():
        stats[n] = LinearStats(absmax=inp.abs().amax(0), mean_abs=inp.abs().mean(0),
                               std=inp.std(0), n_tokens=inp.shape[0], inputs=inp,
                               hessian=(2.0 / inp.shape[0]) * inp.T @ inp if hessian else None)
    return stats


@dataclass(frozen=True)
class SimpleConfig:
    """Minimal stand-in for mixq.config.QuantConfig: weight spec ``w``, activation spec ``a``."""
    w: object
    a: object = None


def make_context(layer: nn.Module, x: torch.Tensor, config, *, index: int | None = 0,
                 hessian: bool = True) -> LayerContext:
    """A LayerContext of `layer` calibrated on `x` (Llama groups)."""
    groups = llama_groups(layer)
    return LayerContext(layer=layer, groups=groups, stats=collect_stats(layer, groups, x, hessian=hessian),
                        config=config, index=index)


@contextlib.contextmanager
def _hooks(layer, groups, fn, transforms=None):
    """Hook every grouped linear: ``fn(name, module, x2d)`` sees its input rows; a linear with an
    online input transform Q returns ``(x Q) W^T + b`` so the float layer stays exact."""
    transforms = transforms or {}

    def hook(mod, inp, out, n):
        x = inp[0].reshape(-1, inp[0].shape[-1])
        fn(n, mod, x)
        if n in transforms:
            return float_output(mod, x.float() @ transforms[n].float()).to(out.dtype).reshape(out.shape)
        return None
    handles = [lin.register_forward_hook(lambda mod, inp, out, n=n: hook(mod, inp, out, n))
               for g in groups for n, lin in zip(g.names, g.linears)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def capture_outputs(layer: nn.Module, x: torch.Tensor, input_transforms: dict | None = None
                    ) -> dict[str, torch.Tensor]:
    """Float outputs (M, N) of every linear of `layer` (Llama groups) on `x`, applying online
    `input_transforms` (name -> Q) where given."""
    out = {}
    tr = input_transforms or {}
    groups = llama_groups(layer)

    def fn(n, mod, i):
        out[n] = float_output(mod, i.float() @ tr[n].float() if n in tr else i)
    with _hooks(layer, groups, fn, tr), torch.no_grad():
        final = layer(x)
    out["_layer"] = final.reshape(-1, final.shape[-1]).float()
    return out


def quantized_outputs(ctx: LayerContext, x: torch.Tensor, *, propagate: bool = False
                      ) -> dict[str, torch.Tensor]:
    """Each linear's quantized output (`quantized_output` with ctx's decisions), plus "_layer":
    the layer's final output (M, D). With ``propagate=False`` every linear sees the float input
    it gets in the float layer (isolated errors) and "_layer" is the float result; with True the
    quantized outputs replace the float ones, so errors propagate (the deployed layer)."""
    out = {}

    def fn(n, mod, i):
        out[n] = quantized_output(mod, i, w_spec=ctx.weight_spec(n), act_bits=ctx.act_bits(n),
                                  qweight=ctx.qweights.get(n), outlier_idx=ctx.outliers(n),
                                  input_transform=ctx.input_transforms.get(n))

    def hook(mod, inp, o, n):
        fn(n, mod, inp[0].reshape(-1, inp[0].shape[-1]))
        return out[n].to(o.dtype).reshape(o.shape)
    if propagate:
        handles = [lin.register_forward_hook(lambda mod, inp, o, n=n: hook(mod, inp, o, n))
                   for g in ctx.groups for n, lin in zip(g.names, g.linears)]
        try:
            with torch.no_grad():
                final = ctx.layer(x)
        finally:
            for h in handles:
                h.remove()
    else:
        with _hooks(ctx.layer, ctx.groups, fn, ctx.input_transforms), torch.no_grad():
            final = ctx.layer(x)
    out["_layer"] = final.reshape(-1, final.shape[-1]).float()
    return out


def layer_errors(ctx: LayerContext, x: torch.Tensor, ref_layer: torch.Tensor) -> dict[str, float]:
    """W4A4 errors of ctx's layer on held-out residual inputs `x` (B, T, D).

    Per linear name: ``||y_q - y||_F / ||y||_F`` against the *same* (possibly transformed) float
    linear on its float input (isolated). "layer": the deployed layer (errors propagate) against
    `ref_layer`, the original float layer's output (B*T, D), measured on the residual update
    ``layer(x) - x``; "mean": the mean of the per-linear errors.
    """
    ref = capture_outputs(ctx.layer, x, ctx.input_transforms)
    q = quantized_outputs(ctx, x)
    errs = {n: rel_fro_error(ref[n], q[n]) for n in q if n != "_layer"}
    errs["mean"] = sum(errs.values()) / len(errs)
    h = x.reshape(-1, x.shape[-1]).float()
    deployed = quantized_outputs(ctx, x, propagate=True)["_layer"]
    errs["layer"] = rel_fro_error(ref_layer - h, deployed - h)
    return errs


def run_methods(methods, *, seed: int, config, n_calib: tuple[int, int] = (4, 64),
                n_test: tuple[int, int] = (2, 64), **layer_kw) -> tuple[dict, dict, float]:
    """Apply `methods` (in order) to a fresh SyntheticLayer(seed) calibrated on fresh inputs and
    measure on held-out inputs.

    Returns:
        ``(errors_rtn, errors_method, float_diff)``: `layer_errors` dicts of plain RTN and of
        the methods, and ``max |layer'(x) - layer(x)| / max |layer(x)|`` of the transformed float
        layer (0 when the function is preserved).
    """
    import copy
    layer = SyntheticLayer(seed=seed, **layer_kw)
    xc = make_inputs(layer, *n_calib, seed=seed + 1)
    xt = make_inputs(layer, *n_test, seed=seed + 2)
    ref = capture_outputs(layer, xt)["_layer"]
    base = make_context(copy.deepcopy(layer), xc, config)
    ctx = make_context(copy.deepcopy(layer), xc, config)
    for m in methods:
        m.apply(ctx)
    after = capture_outputs(ctx.layer, xt, ctx.input_transforms)["_layer"]
    diff = float((after - ref).abs().max() / ref.abs().max())
    return layer_errors(base, xt, ref), layer_errors(ctx, xt, ref), diff
