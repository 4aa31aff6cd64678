"""Per-family model adapters: where the decoder layers, their linears and norms are.

Quantization works one decoder layer at a time and needs, per layer, the *linear groups*: the
linears that read the same input, and the module that produced that input (a norm or a
linear) -- that is where a function-preserving transform (SmoothQuant / AWQ scales, a Hadamard
rotation, an outlier permutation) is folded::

    kind      Llama / Mistral / Qwen2 (SwiGLU)            OPT (pre-norm: do_layer_norm_before)
    attn_in   q, k, v   <- input_layernorm                q, k, v   <- self_attn_layer_norm
    attn_out  o_proj    <- v_proj (a linear)              out_proj  <- v_proj
    mlp_in    gate, up  <- post_attention_layernorm       fc1       <- final_layer_norm
    mlp_out   down_proj <- up_proj (times SiLU(gate))     fc2       <- none (ReLU between)

Notes for methods that fold scales into ``prev_linear``:

* down_proj's input is ``silu(gate(x)) * up(x)``: scaling up_proj's row c by s scales input
  channel c of down_proj by s (the product is linear in up), so the fold is exact.
* o_proj's input is attention(v): a per-channel scale of v_proj's rows passes through the
  softmax-weighted sum unchanged. With grouped-query attention (fewer KV heads than query
  heads) one v_proj row feeds several o_proj channels: `LinearGroup.prev_channel_map` gives,
  for every input channel of the group, the prev_linear row it comes from; a scale can be
  folded only if it is equal on all channels that share a row.

Names are qualified *within the layer* ("self_attn.q_proj"); `ModelAdapter.layer_prefix(i)`
gives the prefix in the model ("model.layers.3").
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["LinearGroup", "ModelAdapter", "LlamaAdapter", "OPTAdapter", "get_adapter",
           "SUPPORTED_MODEL_TYPES", "linear_kind"]


@dataclass
class LinearGroup:
    """Linears of one decoder layer that read the same input.

    Attributes:
        kind: "attn_in" | "attn_out" | "mlp_in" | "mlp_out".
        names: qualified names within the layer, e.g. ("self_attn.q_proj", "self_attn.k_proj").
        linears: the modules, same order as `names` (nn.Linear before quantization).
        prev_norm: the norm whose output is the group's input (RMSNorm / LayerNorm), or None.
        prev_linear: the linear whose output rows are the group's input channels, or None.
        prev_channel_map: None when input channel c comes from row c of prev_linear; else
            int64 (K,) with the prev_linear row of each input channel (grouped-query attention).
    """

    kind: str
    names: tuple[str, ...]
    linears: tuple[nn.Module, ...]
    prev_norm: nn.Module | None = None
    prev_linear: nn.Linear | None = None
    prev_channel_map: torch.Tensor | None = field(default=None, repr=False)

    @property
    def in_features(self) -> int:
        """K, the shared input width."""
        return int(self.linears[0].in_features)


_KIND_OF = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "out_proj": "o",
            "gate_proj": "gate", "up_proj": "up", "down_proj": "down", "fc1": "up", "fc2": "down"}


def linear_kind(name: str) -> str:
    """The kind of a linear (one of `mixq.config.TARGETS`) from its qualified name, the one
    vocabulary of `QuantConfig.targets` and the methods: "self_attn.q_proj" -> "q",
    "mlp.down_proj" -> "down"; OPT "self_attn.out_proj" -> "o", "fc1" -> "up", "fc2" -> "down".
    A name of no known kind returns its last component."""
    leaf = name.rsplit(".", 1)[-1]
    return _KIND_OF.get(leaf, leaf)


class ModelAdapter:
    """Where things are in one model family. Subclasses set `model_types` and the paths."""

    model_types: tuple[str, ...] = ()
    layers_path: str = ""

    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers (nn.ModuleList) of `model` (a *ForCausalLM)."""
        obj = model
        for part in self.layers_path.split("."):
            if not hasattr(obj, part):
                raise ValueError(f"{type(model).__name__} has no {self.layers_path!r} "
                                 f"(expected by {type(self).__name__})")
            obj = getattr(obj, part)
        if not isinstance(obj, nn.ModuleList):
            raise ValueError(f"{self.layers_path} of {type(model).__name__} is "
                             f"{type(obj).__name__}, not an nn.ModuleList")
        return obj

    def layer_prefix(self, i: int) -> str:
        """Qualified name of decoder layer i in the model, e.g. "model.layers.3"."""
        return f"{self.layers_path}.{i}"

    def linear_groups(self, layer: nn.Module) -> list[LinearGroup]:  # pragma: no cover
        raise NotImplementedError

    def lm_head(self, model: nn.Module) -> nn.Module | None:
        """The output projection (shares its weight with the embeddings when tied)."""
        return getattr(model, "lm_head", None)


def _get(layer: nn.Module, name: str) -> nn.Module:
    mod = layer.get_submodule(name)
    return mod


def _group(layer: nn.Module, kind: str, names: tuple[str, ...], *, prev_norm: str | None = None,
           prev_linear: str | None = None, prev_channel_map: torch.Tensor | None = None
           ) -> LinearGroup:
    return LinearGroup(kind=kind, names=names, linears=tuple(_get(layer, n) for n in names),
                       prev_norm=None if prev_norm is None else _get(layer, prev_norm),
                       prev_linear=None if prev_linear is None else _get(layer, prev_linear),
                       prev_channel_map=prev_channel_map)


class LlamaAdapter(ModelAdapter):
    """Llama, Mistral, Qwen2/3 and SmolLM (same layer layout)."""

    model_types = ("llama", "mistral", "qwen2", "qwen3", "smollm3")
    layers_path = "model.layers"

    def linear_groups(self, layer: nn.Module) -> list[LinearGroup]:
        attn = layer.self_attn
        n_q = attn.o_proj.in_features
        n_kv = attn.v_proj.out_features
        cmap = None
        if n_q != n_kv:  # GQA: o_proj channel h*d + j reads v row (h // rep)*d + j
            head_dim = getattr(attn, "head_dim", None) or n_q // attn.config.num_attention_heads
            rep = n_q // n_kv
            c = torch.arange(n_q)
            cmap = (c // head_dim // rep) * head_dim + c % head_dim
        return [
            _group(layer, "attn_in", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                   prev_norm="input_layernorm"),
            _group(layer, "attn_out", ("self_attn.o_proj",), prev_linear="self_attn.v_proj",
                   prev_channel_map=cmap),
            _group(layer, "mlp_in", ("mlp.gate_proj", "mlp.up_proj"),
                   prev_norm="post_attention_layernorm"),
            _group(layer, "mlp_out", ("mlp.down_proj",), prev_linear="mlp.up_proj"),
        ]


class OPTAdapter(ModelAdapter):
    """OPT (pre-norm models; post-norm OPT-350m gets prev_norm=None)."""

    model_types = ("opt",)
    layers_path = "model.decoder.layers"

    def linear_groups(self, layer: nn.Module) -> list[LinearGroup]:
        pre = bool(getattr(layer, "do_layer_norm_before", True))
        return [
            _group(layer, "attn_in", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                   prev_norm="self_attn_layer_norm" if pre else None),
            _group(layer, "attn_out", ("self_attn.out_proj",), prev_linear="self_attn.v_proj"),
            _group(layer, "mlp_in", ("fc1",), prev_norm="final_layer_norm" if pre else None),
            _group(layer, "mlp_out", ("fc2",)),
        ]


_ADAPTERS: tuple[ModelAdapter, ...] = (LlamaAdapter(), OPTAdapter())
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for a in _ADAPTERS for t in a.model_types)


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for a Hugging Face causal LM, chosen by ``model.config.model_type``.

    Raises:
        TypeError: `model` is not an nn.Module.
        ValueError: no config / an unsupported model_type (the message lists the supported ones).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    for adapter in _ADAPTERS:
        if mtype in adapter.model_types:
            return adapter
    raise ValueError(f"unsupported model family {mtype!r} ({type(model).__name__}); "
                     f"supported model_type values: {SUPPORTED_MODEL_TYPES}")
