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

A cache serves one sequence batch. `generate()` with a cache that already holds S tokens
continues that sequence, as HF's caches do: generate feeds only the prompt's tokens beyond the
first S and attends to the cached keys/values for those, so the prompt must *start with* the S
held tokens (e.g. the previous ``generate()`` output followed by new text); otherwise the
output is silently wrong, or, for a prompt of at most S tokens, nothing is fed at all. A HF
cache cannot tell; a `KV4Cache` can, on a model that `guard_generate` has set up
(`mixq.make_cache` does): a forward pre-hook records the ids of the tokens fed with the cache
(`KV4Cache.token_ids`), and ``model.generate`` first calls `KV4Cache.check_prompt`, which raises
ValueError unless the prompt continues the held tokens: it must be longer than S, have their
batch size and start with their ids, which must be known (not fed as ``inputs_embeds`` or
through a model without the hook) and held by every layer (not a forward that failed
part-way). To start a new prompt call ``cache.reset()`` or build a fresh cache
(`mixq.make_cache`). Keys/values whose head layout does not fit the held ones raise ValueError
in `KV4Layer.update`. The check costs one host synchronisation per ``generate()`` call
(comparing the prompt with the held ids) and none per decode step: the hook only appends the
step's ids.
"""
from __future__ import annotations

import functools

import torch
from transformers.cache_utils import Cache, DynamicLayer

from mixq.reference.kv_cache import (KV_BITS, dequantize_kv, pack_codes, quantize_heads,
                                     quantize_keys)
from mixq.validation import check_finite, check_tensor, hot_path

__all__ = ["KV4Layer", "KV4Cache", "guard_generate", "find_kv4_cache", "CACHE_KWARGS"]

_BITS = KV_BITS
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
#: Keyword names under which transformers hands a cache to a model's forward / generate():
#: ``cache`` (5.25 and later; ``past_key_values`` is deprecated there), ``past_key_values``
#: (5.x before) and ``past_key_value`` (4.x; attention modules).
CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")
_GUARD_ATTR = "_mixq_cache_guard"
_MAX_CHUNKS = 32              # token-id chunks kept before they are concatenated into one


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
        check_finite: reject NaN/Inf key/value states in `update` (a device sync per call, so
            off by default: the hot path reads no values, see `mixq.validation`).
    """

    is_croppable = False

    def __init__(self, bits: int = 4, group_size: int = 32, check_finite: bool = False):
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
        check_tensor(key_states, "key_states", ndim=4, dtypes=_FLOATS)
        check_tensor(value_states, "value_states", ndim=4, dtypes=_FLOATS)
        if self.check_finite:                  # opted in: a host sync per update
            check_finite(key_states, "key_states")
            check_finite(value_states, "value_states")
        if key_states.shape != value_states.shape:
            raise ValueError(f"key_states {tuple(key_states.shape)} and value_states "
                             f"{tuple(value_states.shape)} must have one shape (B, Hkv, L, D)")
        if self.is_initialized:
            want = (self.keys.shape[0], self.keys.shape[1], self.head_dim)
            got = (key_states.shape[0], key_states.shape[1], key_states.shape[3])
            if got != want or key_states.device != self.device:
                raise ValueError(f"key_states {tuple(key_states.shape)} on {key_states.device} do "
                                 f"not fit the cache (B, Hkv, D) = {want} on {self.device}")

    @hot_path
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
        check_finite: reject NaN/Inf states in every update (a device sync per layer and step:
            a debugging aid, off by default).
        dequantized_reads: always return the dequantized K/V from `update`, also while mixq
            attention asks for packed reads (see the module docstring): for accuracy
            measurements of a full-sequence forward, not for fast decoding.

    Token ids: on a model set up by `guard_generate`, every forward with this cache records the
    ids it feeds (`record_tokens`); `token_ids` returns them and `check_prompt` (called by the
    guarded ``generate``) refuses a prompt that does not continue them. `reset` empties both.
    """

    def __init__(self, config=None, *, bits: int = 4, group_size: int = 32,
                 check_finite: bool = False, dequantized_reads: bool = False):
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
        self._clear_tokens()

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

    # -- the token ids of the held sequence ----------------------------------------------------
    def _clear_tokens(self) -> None:
        self._token_chunks: list[torch.Tensor] = []    # int64 (B, n) each, in feeding order
        self._n_tokens = 0                              # tokens recorded (ids known or not)
        self._ids_known = True

    def record_tokens(self, input_ids: torch.Tensor | None, n: int) -> None:
        """Note the `n` tokens a forward is about to feed: `input_ids` int (B, n), or None when
        they come as ``inputs_embeds`` (their ids are then unknown and `token_ids` is None
        until `reset`). Called by the forward pre-hook of `guard_generate`; appends a copy of
        the ids (no host synchronisation)."""
        self._n_tokens += int(n)
        ok = (self._ids_known and isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2
              and not input_ids.is_floating_point() and input_ids.shape[1] == n
              and (not self._token_chunks
                   or self._token_chunks[0].shape[0] == input_ids.shape[0]))
        if not ok:
            self._ids_known, self._token_chunks = False, []
            return
        self._token_chunks.append(input_ids.detach().to(torch.int64, copy=True))
        if len(self._token_chunks) > _MAX_CHUNKS:
            self._token_chunks = [torch.cat(self._token_chunks, dim=1)]

    @property
    def token_ids(self) -> torch.Tensor | None:
        """int64 (B, S): the ids of the S tokens whose keys/values the cache holds, when every
        one was recorded (`record_tokens`) and every layer holds S tokens; else None (ids fed as
        embeddings, a forward without the `guard_generate` hook, or one that failed part-way).
        Ids recorded by a forward that failed before any layer stored its tokens are dropped.
        Empty cache: None."""
        lengths = {layer.get_seq_length() for layer in self.layers}
        if len(lengths) != 1 or not self._ids_known or not self._token_chunks:
            return None
        (s,) = lengths
        if s == 0 or s > self._n_tokens:
            return None
        if len(self._token_chunks) > 1 or s < self._n_tokens:
            self._token_chunks = [torch.cat(self._token_chunks, dim=1)[:, :s]]
            self._n_tokens = s
        return self._token_chunks[0]

    def check_prompt(self, input_ids) -> None:
        """Raise ValueError unless ``generate(input_ids, past_key_values=self)`` continues the
        held sequence (see the module docstring); an empty cache accepts any prompt.

        Args:
            input_ids: int (B, L) prompt ids, or None (a prompt given as ``inputs_embeds``).
        Raises:
            ValueError: the cache holds S > 0 tokens and the layers disagree on S, the held ids
                are unknown, `input_ids` is not an int (B, L) tensor, B differs from the held
                batch, L <= S, or ``input_ids[:, :S]`` differs from `token_ids` (one host
                synchronisation).
        """
        lengths = sorted({layer.get_seq_length() for layer in self.layers})
        if lengths[-1:] in ([], [0]):
            if self._n_tokens:
                self._clear_tokens()    # a forward failed before any layer stored a token
            return
        how = ("To continue the cached sequence pass it followed by new tokens (e.g. the "
               "previous generate() output plus the next input); for a new prompt call "
               "cache.reset() or use a fresh cache (mixq.make_cache(model)).")
        if len(lengths) > 1:
            raise ValueError(f"this KV4Cache is inconsistent: its layers hold {lengths} tokens "
                             "(a forward failed part-way); call cache.reset() or use a fresh "
                             "cache (mixq.make_cache(model))")
        s = lengths[0]
        held = self.token_ids
        if held is None:
            raise ValueError(
                f"this KV4Cache holds {s} tokens whose ids it did not record (fed as "
                "inputs_embeds, or through a model that mixq.make_cache / "
                "mixq.hf.kv_cache.guard_generate did not set up), so it cannot check that the "
                "prompt continues them; call cache.reset() or use a fresh cache "
                "(mixq.make_cache(model)) for a new prompt")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or \
                input_ids.is_floating_point():
            what = "none" if input_ids is None else (
                f"{type(input_ids).__name__} {tuple(getattr(input_ids, 'shape', ()))}")
            raise ValueError(f"this KV4Cache holds {s} tokens; generate() can continue them only "
                             f"from int input_ids (B, L) that start with them, got {what}. {how}")
        b, length = input_ids.shape
        if b != held.shape[0]:
            raise ValueError(f"the prompt has batch size {b} but this KV4Cache holds a sequence "
                             f"batch of {held.shape[0]}. {how}")
        if length <= s:
            raise ValueError(f"the prompt has {length} tokens but this KV4Cache already holds {s}: "
                             f"generate() would feed it no new token. {how}")
        if not torch.equal(input_ids[:, :s].to(device=held.device, dtype=torch.int64), held):
            raise ValueError(
                f"the prompt does not start with the {s} tokens this KV4Cache holds (from an "
                f"earlier generate() or forward): generate() would feed only its tokens "
                f"{s}..{length - 1} and attend to the cached keys/values as if they were its "
                f"first {s}, i.e. silently wrong output. {how}")

    def _map_tokens(self, fn) -> None:
        held = self.token_ids
        if held is not None:
            self._token_chunks = [fn(held)]
        elif self._n_tokens:
            self._ids_known, self._token_chunks = False, []

    def reset(self) -> None:
        """Empty every layer and forget the recorded token ids: the cache takes a new prompt."""
        super().reset()
        self._clear_tokens()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_tokens(lambda t: t.index_select(0, beam_idx.to(t.device)))
        super().reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_tokens(lambda t: t.repeat_interleave(repeats, dim=0))
        super().batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_tokens(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor)
                                     else indices, ...])
        super().batch_select_indices(indices)


# ------------------------------------------------------------------------------- generate() guard
def find_kv4_cache(args, kwargs) -> KV4Cache | None:
    """The `KV4Cache` among a call's arguments (a model's or an attention module's forward,
    generate()), whatever transformers calls it (keyword names `CACHE_KWARGS`, or
    positional), or None."""
    for name in CACHE_KWARGS:
        if isinstance(kwargs.get(name), KV4Cache):
            return kwargs[name]
    return next((a for a in args if isinstance(a, KV4Cache)), None)


def _record_hook(model, args, kwargs) -> None:
    """Forward pre-hook of `guard_generate`: the tokens this forward feeds a `KV4Cache`."""
    cache = find_kv4_cache(args, kwargs)
    if cache is None:
        return
    ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
    if isinstance(ids, torch.Tensor):
        n = int(ids.shape[-1]) if ids.dim() else 0
        if n == 0 and cache.get_seq_length() > 0:     # shapes only: no synchronisation
            raise ValueError(f"input_ids {tuple(ids.shape)} feed no token to a KV4Cache holding "
                             f"{cache.get_seq_length()}: a generate() prompt must be longer than "
                             "the cached sequence it continues (cache.reset() for a new prompt)")
        cache.record_tokens(ids, n)
        return
    embeds = kwargs.get("inputs_embeds")
    n = int(embeds.shape[1]) if isinstance(embeds, torch.Tensor) and embeds.dim() == 3 else 0
    cache.record_tokens(None, n)


def _guarded_generate(model, *args, **kwargs):
    """``model.generate`` after `guard_generate`: `KV4Cache.check_prompt`, then the class's
    generate unchanged."""
    cache = find_kv4_cache((), kwargs)
    if cache is not None:
        ids = args[0] if args else kwargs.get("inputs", kwargs.get("input_ids"))
        cache.check_prompt(ids)
    return type(model).generate(model, *args, **kwargs)


def guard_generate(model: torch.nn.Module) -> torch.nn.Module:
    """Set `model` up so that a `KV4Cache` knows which tokens it holds; in place, idempotent.

    Installs (once) a forward pre-hook that hands every `KV4Cache` passed to the model the ids
    of the tokens the call feeds (`KV4Cache.record_tokens`; a call that feeds no token to a
    non-empty cache raises ValueError, from shapes only), and replaces ``model.generate`` by a
    wrapper that runs `KV4Cache.check_prompt` on the prompt before the class's ``generate``
    (other caches, or none, pass unchanged). `mixq.make_cache` calls it.

    Args:
        model: a transformers causal LM (has ``generate``).
    Returns:
        `model`.
    """
    if not isinstance(model, torch.nn.Module) or not callable(getattr(type(model), "generate",
                                                                       None)):
        raise TypeError(f"model must be a transformers causal LM with generate(), "
                        f"got {type(model).__name__}")
    if not getattr(model, _GUARD_ATTR, False):
        model.register_forward_pre_hook(_record_hook, with_kwargs=True)
        model.generate = functools.partial(_guarded_generate, model)
        setattr(model, _GUARD_ATTR, True)
    return model
