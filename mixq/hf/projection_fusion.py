"""`fuse_projections(model)`: q/k/v as one GEMM and gate/up as one GEMM in every decoder layer of
a quantized Hugging Face model (`mixq.nn.stacked.StackedLinear`).

For each linear group of a layer that reads one input (`mixq.hf.models` adapters: ``attn_in``
= q/k/v, ``mlp_in`` = gate/up; OPT's fc1 is alone) whose quantized linears can be stacked
(`mixq.nn.stacked.stack_problem`: one class, one weight grid, one outlier set), the stack is
registered beside them (``self_attn.mixq_qkv``, ``mlp.mixq_gate_up``) and each member is
replaced by a `StackedPart` under its own name, so the model code, the state_dict keys and
saved checkpoints do not change. A pre-norm already fused with its consumers
(`mixq.hf.norm_fusion`) hands its payload to the stack instead.

The result equals the unstacked model's on the reference path bit for bit; on the kernels the
integer parts are equal and the float epilogue may round differently where the larger N tunes
another tile (see `mixq.nn.stacked`). It changes speed, not what the model computes.
"""
from __future__ import annotations

from torch import nn

from mixq.hf.models import get_adapter
from mixq.nn.norm import QuantNorm, relink_consumers
from mixq.nn.stacked import StackedLinear, StackedPart, stack_problem

__all__ = ["STACK_NAMES", "fuse_projections"]

#: Where a group's stack is registered, relative to the members' parent module.
STACK_NAMES = {"attn_in": "mixq_qkv", "mlp_in": "mixq_gate_up"}


def fuse_projections(model: nn.Module, *, strict: bool = False) -> dict[str, str]:
    """Stack the quantized linears of every q/k/v and gate/up group, in place.

    Args:
        model: a causal LM quantized by `mixq.quantize` (any mode whose linears are mixq
            modules with per-row or per-group weight scales).
        strict: raise ValueError on a group that cannot be stacked instead of skipping it.
    Returns:
        {qualified stack name: "stacked <- q_proj, ..." or "skipped: <reason>"}; a group
        already stacked reports "skipped: already stacked".
    """
    adapter = get_adapter(model)
    report: dict[str, str] = {}
    for i, layer in enumerate(adapter.layers(model)):
        for group in adapter.linear_groups(layer):
            if group.kind not in STACK_NAMES or len(group.linears) < 2:
                continue
            parent_name, _, _ = group.names[0].rpartition(".")
            parent = layer.get_submodule(parent_name) if parent_name else layer
            qname = ".".join(p for p in (adapter.layer_prefix(i), parent_name,
                                         STACK_NAMES[group.kind]) if p)
            if any(n.rpartition(".")[0] != parent_name for n in group.names):
                problem = "the linears have different parent modules"
            elif all(isinstance(m, StackedPart) for m in group.linears):
                report[qname] = "skipped: already stacked"
                continue
            else:
                problem = stack_problem(group.linears)
            if problem is None and hasattr(parent, STACK_NAMES[group.kind]):
                problem = f"{parent_name or 'the layer'} already has {STACK_NAMES[group.kind]!r}"
            if problem:
                if strict:
                    raise ValueError(f"{qname}: cannot stack {group.names}: {problem}")
                report[qname] = f"skipped: {problem}"
                continue
            short = tuple(n.rpartition(".")[2] for n in group.names)
            stack = StackedLinear(group.linears, names=short)
            if isinstance(group.prev_norm, QuantNorm):      # norm fused before: hand off to the stack
                relink_consumers(group.prev_norm, group.linears, stack.fused)
            parent.add_module(STACK_NAMES[group.kind], stack)
            for j, name in enumerate(short):
                parent.set_submodule(name, StackedPart(stack, j))
            report[qname] = "stacked <- " + ", ".join(short)
    return report
