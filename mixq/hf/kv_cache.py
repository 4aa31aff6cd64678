"""`KV4Cache`: a 4-bit (or 8-bit) KIVI-style key/value cache for Hugging Face `generate()`.

One `KV4Layer` per decoder layer holds, for keys/values of shape (B, Hkv, T, D), the codes and
fp16 scales of the tokens in whole groups of G and the float residual window of the newest
``T mod G`` tokens; the layout and the math are `mixq.reference.kv_cache` (read it first). When
the window reaches G tokens it is quantized and moved into the codes (so a token is quantized
exactly once).

How attention reads it: by default `update` returns the full dequantized (fp32) K/V, so any
attention implementation works (slowly). Under `mixq.hf.attention.enable_quantized_attention`,
a forward pre-hook on each attention module sets ``cache.packed_reads = True`` for that call:
`update` then returns only the new states, and the mixq attention function reads the layer
itself (``cache.layers[module.layer_idx]``): the decode kernel reads the packed codes directly.
With ``dequantized_reads=True`` the cache always returns the dequantized K/V, also to mixq
attention and also for the tokens of the current call: a full-sequence forward then sees K/V
exactly as a decode step would read them from the cache (how `mixq.eval.perplexity` measures
the accuracy of the 4-bit cache).

A cache serves one sequence batch: `generate()` with a cache that already holds tokens
continues that sequence (as HF's caches do); to start a new prompt call ``cache.reset()`` or
build a fresh one (`mixq.make_cache`). A prompt whose batch size or head layout does not fit
the held tokens raises ValueError.
"""
from __future__ import annotations

import functools

import torch
from transformers.cache_utils import Cache, DynamicLayer

from mixq.reference.kv_cache import (KV_BITS, dequantize_kv, pack_codes, quantize_heads,
                                     quantize_keys)
from mixq.validation import check_tensor

__all__ = ["KV4Layer", "KV4Cache"]

_BITS = KV_BITS
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _check_args(bits, group_size) -> None:
    if isinstance(bits, bool) or bits not in _BITS:
        raise ValueError(f"bits must be one of {_BITS}, got {bits!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")


class KV4Layer(DynamicLayer):
    """One layer of `KV4Cache` (see the module docstring for the layout and the math).

    Args:
        bits: 4 (packed, two codes per byte) or 8 (int8 codes).
        group_size: G, the number of tokens that share one key scale per channel (default 32).
        check_finite: reject NaN/Inf key/value states in `update` (a device sync per call).
    """

    is_croppable = False

    def __init__(self, bits: int = 4, group_size: int = 32, check_finite: bool = True):
        _check_args(bits, group_size)
        super().__init__()
        self.bits, self.group_size, self.check_finite = bits, group_size, bool(check_finite)
        self.cumulative_length = 0
        self.return_new_only = False
        self.head_dim = None
        self.k_codes = self.k_scale = self.v_codes = self.v_scale = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        if self.bits == 4 and d % 2:
            raise ValueError(f"bits=4 packs two channels per byte: head_dim must be even, got {d}")
        self.head_dim = d
        width, code_dtype = (d // 2, torch.uint8) if self.bits == 4 else (d, torch.int8)
        self.keys = key_states.new_empty((b, h, 0, d))
        self.values = value_states.new_empty((b, h, 0, d))
        self.k_codes = torch.empty((b, h, 0, width), dtype=code_dtype, device=self.device)
        self.v_codes = torch.empty_like(self.k_codes)
        self.k_scale = torch.empty((b, h, 0, d), dtype=torch.float16, device=self.device)
        self.v_scale = torch.empty((b, h, 0), dtype=torch.float16, device=self.device)
        self.is_initialized = True

    def _check_states(self, key_states, value_states) -> None:
        check_tensor(key_states, "key_states", ndim=4, dtypes=_FLOATS, finite=self.check_finite)
        check_tensor(value_states, "value_states", ndim=4, dtypes=_FLOATS,
                     finite=self.check_finite)
        if key_states.shape != value_states.shape:
            raise ValueError(f"key_states {tuple(key_states.shape)} and value_states "
                             f"{tuple(value_states.shape)} must have one shape (B, Hkv, L, D)")
        if self.is_initialized:
            want = (self.keys.shape[0], self.keys.shape[1], self.head_dim)
            got = (key_states.shape[0], key_states.shape[1], key_states.shape[3])
            if got != want or key_states.device != self.device:
                raise ValueError(f"key_states {tuple(key_states.shape)} on {key_states.device} do "
                                 f"not fit the cache (B, Hkv, D) = {want} on {self.device}")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (B, Hkv, L, D) keys/values; quantize every completed group of G tokens.

        Returns the full dequantized fp32 K/V (B, Hkv, T, D), or, while ``return_new_only``
        is set (by `KV4Cache.packed_reads`), the given states unchanged.
        """
        self._check_states(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys = torch.cat([self.keys, key_states.to(self.dtype)], dim=-2)
        values = torch.cat([self.values, value_states.to(self.dtype)], dim=-2)
        n_full = keys.shape[2] // self.group_size * self.group_size
        if n_full:
            k_codes, k_scale = quantize_keys(keys[:, :, :n_full], self.bits, self.group_size)
            v_codes, v_scale = quantize_heads(values[:, :, :n_full], self.bits)
            self.k_codes = torch.cat([self.k_codes, pack_codes(k_codes, self.bits)], dim=2)
            self.v_codes = torch.cat([self.v_codes, pack_codes(v_codes, self.bits)], dim=2)
            self.k_scale = torch.cat([self.k_scale, k_scale], dim=2)
            self.v_scale = torch.cat([self.v_scale, v_scale], dim=2)
        self.keys = keys[:, :, n_full:].contiguous()
        self.values = values[:, :, n_full:].contiguous()
        self.cumulative_length += key_states.shape[2]
        if self.return_new_only:
            return key_states, value_states
        return self.dequantize()

    def get_seq_length(self, *args, **kwargs) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length, *args, **kwargs) -> tuple[int, int]:
        """(kv_length, kv_offset) for the mask of the next `query_length` tokens (an int; a
        cache_position tensor, as older transformers pass, counts as its length)."""
        n = query_length.shape[0] if isinstance(query_length, torch.Tensor) else int(query_length)
        return self.cumulative_length + n, 0

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached K and V, dequantized: fp32 (B, Hkv, T, D) each
        (`mixq.reference.kv_cache.dequantize_kv`)."""
        if not self.is_initialized:
            raise ValueError("the KV4 layer is empty")
        return dequantize_kv(self.k_codes, self.k_scale, self.v_codes, self.v_scale, self.keys,
                             self.values, bits=self.bits, group_size=self.group_size)

    def packed_state(self) -> dict[str, torch.Tensor] | None:
        """The tensors the decode kernel reads (contiguous), or None when empty:
        k_codes, v_codes (B, Hkv, Tq, D/2 uint8 | D int8); k_scale fp16 (B, Hkv, Tq/G, D);
        v_scale fp16 (B, Hkv, Tq); k_res, v_res (B, Hkv, T - Tq, D) in the model's dtype."""
        if not self.is_initialized:
            return None
        return {"k_codes": self.k_codes.contiguous(), "k_scale": self.k_scale.contiguous(),
                "v_codes": self.v_codes.contiguous(), "v_scale": self.v_scale.contiguous(),
                "k_res": self.keys.contiguous(), "v_res": self.values.contiguous()}

    def kv_bytes(self) -> int:
        """Bytes held: codes, scales and the residual window."""
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for t in self.packed_state().values())

    def _map(self, fn) -> None:
        if self.is_initialized:
            for name in ("keys", "values", "k_codes", "k_scale", "v_codes", "v_scale"):
                setattr(self, name, fn(getattr(self, name)))

    def reset(self) -> None:
        self.is_initialized = False
        self.keys = self.values = None
        self.k_codes = self.k_scale = self.v_codes = self.v_scale = None
        self.cumulative_length = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices, ...])


class KV4Cache(Cache):
    """A transformers `Cache` of `KV4Layer`s: pass it as ``past_key_values`` to `generate()`.

    Args:
        config: the model config (its text config's ``num_hidden_layers`` sizes the cache), or
            None to add layers as they are first updated.
        bits: 4 (default, packed int4) or 8.
        group_size: G tokens per key scale (default 32); also the largest residual window.
        check_finite: reject NaN/Inf states in every update (a device sync per layer and step;
            pass False for fast GPU decoding).
        dequantized_reads: always return the dequantized K/V from `update`, also while mixq
            attention asks for packed reads (see the module docstring): for accuracy
            measurements of a full-sequence forward, not for fast decoding.
    """

    def __init__(self, config=None, *, bits: int = 4, group_size: int = 32,
                 check_finite: bool = True, dequantized_reads: bool = False):
        _check_args(bits, group_size)
        make = functools.partial(KV4Layer, bits=bits, group_size=group_size,
                                 check_finite=check_finite)
        if config is None:
            super().__init__(layer_class_to_replicate=make)
        else:
            n_layers = config.get_text_config(decoder=True).num_hidden_layers
            super().__init__(layers=[make() for _ in range(n_layers)])
        if not isinstance(dequantized_reads, bool):
            raise TypeError(f"dequantized_reads must be a bool, got {dequantized_reads!r}")
        self.bits, self.group_size = bits, group_size
        self.dequantized_reads = dequantized_reads
        self._packed_reads = False

    @property
    def packed_reads(self) -> bool:
        """While True, `update` returns only the new states (the attention reads the layer);
        always False with ``dequantized_reads``."""
        return self._packed_reads

    @packed_reads.setter
    def packed_reads(self, on: bool) -> None:
        self._packed_reads = bool(on) and not self.dequantized_reads

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if self.layer_class_to_replicate is not None:
            while len(self.layers) <= layer_idx:
                self.layers.append(self.layer_class_to_replicate())
        layer = self.layers[layer_idx]
        layer.return_new_only = self._packed_reads
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def kv_bytes(self) -> int:
        """Bytes held by every layer (codes, scales, residual windows)."""
        return sum(layer.kv_bytes() for layer in self.layers)
