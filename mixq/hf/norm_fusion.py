"""`fuse_norm_quant(model)`: give each pre-norm of a quantized Hugging Face model the W4A4
linears that read it, as a `mixq.nn.norm.QuantNorm` (see that module for the hand-off).

Requirement: the consumers of one norm must share ``outlier_idx`` and ``act_bits`` (they read one
payload). `mixq.api.quantize` chooses outliers per linear; with the default
``outlier_strategy="calib_max"`` q/k/v (and gate/up) see the same input, hence the same
calibration max |x| and the same top-k channels. Salient-*weight* strategies ("max",
"mean3std", "argmax") rank each linear's own weight and generally differ: those groups are not
fused (`fuse_norm_quant` reports why).

Hadamard rotation (`mixq.methods.rotation`): for attn_in / mlp_in it folds the norm weight into
the linears and wraps them in `mixq.nn.RotatedInputLinear` (an online ``x @ Q``), so their
input is not the norm output: such groups are skipped.

Stacked projections (`mixq.hf.projection_fusion`): the consumer of a group whose linears are
`StackedPart` modules is their stack's one module.
"""
from __future__ import annotations

from torch import nn

from mixq.hf.models import get_adapter
from mixq.nn.norm import QuantNorm, attach_consumers
from mixq.nn.stacked import StackedPart

__all__ = ["fuse_norm_quant"]


def _consumers(linears) -> list[nn.Module]:
    """The modules that run the group's GEMMs: a stack (`mixq.hf.projection_fusion`) once for
    its parts, other linears as they are."""
    out: list[nn.Module] = []
    for lin in linears:
        m = lin.stack.fused if isinstance(lin, StackedPart) else lin
        if all(m is not o for o in out):
            out.append(m)
    return out


def fuse_norm_quant(model: nn.Module, *, strict: bool = False) -> dict[str, str]:
    """Replace each pre-norm of a quantized model by a `QuantNorm` feeding its W4A4 consumers.

    For every decoder layer (`mixq.hf.models` adapters), every linear group with a ``prev_norm``
    (Llama input/post_attention_layernorm, OPT self_attn/final_layer_norm) whose linears are
    all W4A4Linear on the kernel path sharing ``outlier_idx`` and ``act_bits``.

    Args:
        model: a causal LM quantized by `mixq.quantize` (mode w4a4).
        strict: raise ValueError on a group that cannot be fused instead of skipping it.
    Returns:
        {qualified norm name: "fused -> q_proj, ..." or "skipped: <reason>"}.
    """
    adapter = get_adapter(model)
    report: dict[str, str] = {}
    for i, layer in enumerate(adapter.layers(model)):
        names = {id(m): n for n, m in layer.named_modules()}
        for group in adapter.linear_groups(layer):
            if group.prev_norm is None:
                continue
            qname = f"{adapter.layer_prefix(i)}.{names[id(group.prev_norm)]}"
            if isinstance(group.prev_norm, QuantNorm):
                report[qname] = "skipped: already fused"
                continue
            consumers = _consumers(group.linears)
            first = consumers[0]
            try:
                qn = QuantNorm.from_norm(group.prev_norm,
                                         outlier_idx=getattr(first, "outlier_idx", None),
                                         bits=getattr(first, "act_bits", 4))
                attach_consumers(qn, consumers)
            except (TypeError, ValueError) as e:
                if strict:
                    raise ValueError(f"{qname}: cannot fuse with {group.names}: {e}") from e
                report[qname] = f"skipped: {e}"
                continue
            qn.to(next(first.buffers()).device)
            layer.set_submodule(names[id(group.prev_norm)], qn)
            report[qname] = "fused -> " + ", ".join(group.names)
    return report
