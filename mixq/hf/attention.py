"""Hugging Face glue of the quantized attention: registration, dispatch, the cache hooks.

`enable_quantized_attention(model, config)` registers the attention function
`mixq_attention_forward` under the name ``"mixq"`` (with HF's eager additive masks, built by
`additive_mask` without a host-to-device copy) and switches
the model to it with ``model.set_attn_implementation("mixq")``; the config (a
`mixq.config.AttentionQuantConfig`) lives on every attention module as
``module.mixq_attention_config``. The math is `mixq.reference.attention` (read its module
docstring); the kernels are `mixq.kernels.attention`. With a `mixq.hf.kv_cache.KV4Cache`,
decoding reads the packed cache (see `mixq_attention_forward`).
"""
from __future__ import annotations

import dataclasses

import torch

from mixq.config import AttentionQuantConfig
from mixq.hf.kv_cache import KV4Cache, find_kv4_cache
from mixq.reference.attention import check_attention_config, quantized_attention_reference
from mixq.validation import hot_path

__all__ = ["mixq_attention_forward", "enable_quantized_attention", "disable_quantized_attention",
           "ATTN_IMPLEMENTATION"]

ATTN_IMPLEMENTATION = "mixq"
"""Name under which `mixq_attention_forward` is registered in transformers' AttentionInterface."""

_DECODE_MAX_LQ = 16          # the decode kernel handles up to this many new tokens


# ------------------------------------------------------------------------------- HF integration
def _kv4_layer(module):
    """The `KV4Layer` this attention module writes to, when a KV4Cache drives this forward."""
    cache = getattr(module, "_mixq_kv_cache", None)
    if not isinstance(cache, KV4Cache) or module.layer_idx is None:
        return None
    return cache.layers[module.layer_idx]


@hot_path
def mixq_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                           value: torch.Tensor, attention_mask: torch.Tensor | None,
                           scaling: float | None = None, dropout: float = 0.0,
                           **kwargs) -> tuple[torch.Tensor, None]:
    """HF attention-interface function (registered as ``"mixq"``): quantized attention.

    Reads ``module.mixq_attention_config`` (default `AttentionQuantConfig()`). Dispatch:

    * no KV4 cache (or a KV4 layer holding only the tokens of this call, i.e. the prefill):
      attention over the given key/value with the config: the prefill kernel
      (`mixq.kernels.attention.quantized_attention`) when ``config.kernels_for(query)``, else
      `quantized_attention_reference`;
    * a `KV4Cache` with earlier tokens: K/V come from the cache, whose own 4-bit (or 8-bit)
      quantization replaces k_bits / v_bits. Kernels and Lq <= 16: the decode kernel reads the
      packed cache directly (`mixq.kernels.attention.kv4_decode_attention`); otherwise the
      reference runs on the cache's dequantized K/V (`KV4Layer.dequantize`).

    The cache is found through ``module._mixq_kv_cache`` (set by the forward pre-hook that
    `enable_quantized_attention` installs, from the ``past_key_values`` argument of the attention
    module) and ``module.layer_idx``. Returns ``(out (B, Lq, Hq, D), None)``; attention weights
    are not materialized.
    """
    if dropout and module.training:
        raise ValueError(f"mixq attention has no dropout (got dropout={dropout} in training mode)")
    config = getattr(module, "mixq_attention_config", None) or AttentionQuantConfig()
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    is_causal = bool(getattr(module, "is_causal", True))
    layer = _kv4_layer(module)
    if layer is not None and layer.get_seq_length() > query.shape[2]:
        cache_config = dataclasses.replace(config, k_bits=None, v_bits=None)
        if config.kernels_for(query) and query.shape[2] <= _DECODE_MAX_LQ:
            from mixq.kernels.attention import kv4_decode_attention

            st = layer.packed_state()
            out = kv4_decode_attention(query, st["k_codes"], st["k_scale"], st["v_codes"],
                                       st["v_scale"], st["k_res"], st["v_res"], attention_mask,
                                       bits=layer.bits, group_size=layer.group_size,
                                       scaling=scaling, config=cache_config,
                                       is_causal=is_causal, check_finite=False)
        else:
            k_full, v_full = layer.dequantize()
            out = quantized_attention_reference(query, k_full, v_full, attention_mask,
                                                scaling=scaling, config=cache_config,
                                                is_causal=is_causal)
        return out, None
    if config.kernels_for(query):
        from mixq.kernels.attention import quantized_attention

        out = quantized_attention(query, key, value, attention_mask, scaling=scaling,
                                  config=config, is_causal=is_causal, check_finite=False)
    else:
        out = quantized_attention_reference(query, key, value, attention_mask, scaling=scaling,
                                            config=config, is_causal=is_causal)
    return out, None


def additive_mask(*args, **kwargs) -> torch.Tensor | None:
    """HF's ``eager_mask`` (same arguments and values: 0 where a key is seen, the dtype's min
    where it is masked; (B, 1, Lq, Lkv)), built without a host-to-device copy, so a forward
    can be captured in a CUDA graph: transformers' version writes ``torch.where(mask,
    torch.tensor(0.0, device=...), min)``, a CPU -> GPU copy on every call; here the boolean
    mask of ``sdpa_mask`` fills a zero tensor in place (``masked_fill_`` takes the min as a
    kernel argument)."""
    import inspect

    from transformers.masking_utils import eager_mask, sdpa_mask

    bound = inspect.signature(eager_mask).bind(*args, **kwargs)
    bound.apply_defaults()
    named = dict(bound.arguments)
    extra = named.pop("kwargs", {})
    dtype = named.pop("dtype")
    extra.pop("allow_is_causal_skip", None)
    mask = sdpa_mask(**named, allow_is_causal_skip=False, **extra)
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
        ~mask, torch.finfo(dtype).min)


def _register() -> None:
    import transformers
    from transformers.masking_utils import AttentionMaskInterface

    transformers.AttentionInterface.register(ATTN_IMPLEMENTATION, mixq_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, additive_mask)   # additive float masks


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    mods = [m for m in model.modules()
            if hasattr(m, "layer_idx") and hasattr(m, "scaling") and hasattr(m, "is_causal")]
    if not mods:
        raise ValueError(f"{type(model).__name__} has no HF attention modules (modules with "
                         "layer_idx, scaling and is_causal); expected e.g. LlamaForCausalLM or "
                         "OPTForCausalLM")
    return mods


def _capture_cache(module, args, kwargs):
    module._mixq_kv_cache = find_kv4_cache(args, kwargs)
    if module._mixq_kv_cache is not None:
        module._mixq_kv_cache.packed_reads = True


def _release_cache(module, args, kwargs, output):
    cache = getattr(module, "_mixq_kv_cache", None)
    if cache is not None and hasattr(cache, "packed_reads"):
        cache.packed_reads = False
    module._mixq_kv_cache = None


def enable_quantized_attention(model: torch.nn.Module,
                               config: AttentionQuantConfig | None = None) -> torch.nn.Module:
    """Switch an HF model (Llama, OPT, ...) to mixq quantized attention, in place; returns it.

    Registers ``"mixq"`` in transformers' AttentionInterface / AttentionMaskInterface, stores
    `config` on every attention module (``module.mixq_attention_config``), installs a forward
    pre/post hook pair per attention module that exposes a `KV4Cache` to the attention function,
    and calls ``model.set_attn_implementation("mixq")``. `disable_quantized_attention` undoes it.
    """
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    config = check_attention_config(config)
    _register()
    if not hasattr(model, "_mixq_prev_attn"):
        model._mixq_prev_attn = model.config._attn_implementation
    for mod in _attention_modules(model):
        mod.mixq_attention_config = config
        if not hasattr(mod, "_mixq_hooks"):
            mod._mixq_hooks = (
                mod.register_forward_pre_hook(_capture_cache, with_kwargs=True),
                mod.register_forward_hook(_release_cache, with_kwargs=True, always_call=True))
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model


def disable_quantized_attention(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `enable_quantized_attention`: previous attention implementation, hooks removed."""
    if not hasattr(model, "_mixq_prev_attn"):
        raise ValueError("quantized attention is not enabled on this model")
    for mod in _attention_modules(model):
        for h in getattr(mod, "_mixq_hooks", ()):
            h.remove()
        for name in ("_mixq_hooks", "mixq_attention_config", "_mixq_kv_cache"):
            if hasattr(mod, name):
                delattr(mod, name)
    model.set_attn_implementation(model._mixq_prev_attn or "eager")
    del model._mixq_prev_attn
    return model
