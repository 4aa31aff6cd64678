"""Evaluation of (quantized) causal LMs: WikiText-2 perplexity, tokens per second, weight bytes.

Perplexity (the standard recipe the GPTQ/AWQ/QuaRot papers report)::

    ids   = tokenizer(whole test text)                      # tokenized once, one BOS at most
    windows of `seqlen` consecutive tokens, no overlap      # the last one may be shorter
    NLL   = sum over windows, over positions t >= 1 of  -log p(ids[t] | ids[<t in the window])
    ppl   = exp(NLL / number of scored tokens)              # each window scores len - 1 tokens

Log-probabilities are computed in float32 from the logits whatever the model dtype.

WikiText-2 text: the staged raw file (``wikitext-2-raw/wiki.{test,valid}.raw``) as it is. If
not staged and online, Hugging Face ``datasets`` ("wikitext", "wikitext-2-raw-v1") gives one row
per line of that same file, keeping the line's ``"\\n"``, except blank lines which become ``""``
(the dataset builder yields ``row if row.strip() else ""``). Every blank line of the raw files is
``" \\n"``, so `rows_to_raw_text` (``"".join(row or " \\n")``) rebuilds the raw file exactly
(tests/test_eval.py checks this on the staged files; defined in mixq.calibrate, which calibrates
on the same text). The common ``"\\n\\n".join(rows)``
(GPTQ's scripts) does *not*: it inserts an extra blank line between all lines, which changes the
token count and the perplexity slightly; mixq never uses it.
"""
from __future__ import annotations

import math
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from mixq.calibrate import SPLITS, rows_to_raw_text, wikitext2_text
from mixq.nn import QuantLinearBase

__all__ = ["wikitext2_text", "rows_to_raw_text", "perplexity", "tokens_per_second",
           "weight_bytes", "SPLITS"]

def _model_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def _max_positions(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "max_position_embeddings", None) if cfg is not None else None


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer, *, split: str = "test", seqlen: int | None = None,
               max_windows: int | None = None, max_tokens: int | None = None,
               batch_size: int = 1, device=None, text: str | None = None,
               progress: bool = True, cache_factory=None) -> dict:
    """Perplexity of a causal LM on WikiText-2 (see the module docstring for the recipe).

    Args:
        model: a Hugging Face causal LM (returns ``.logits`` (B, T, V)).
        tokenizer: its tokenizer.
        split: "test" (default) or "valid".
        seqlen: window length; default ``min(2048, model.config.max_position_embeddings)``.
        max_windows: score only the first windows (None: all, including a shorter last one).
        max_tokens: keep only the first tokens of the tokenized text before windowing.
        batch_size: full-length windows per forward call.
        device: where inputs go (default: the model's device).
        text: score this text instead of WikiText-2 (`split` ignored).
        progress: tqdm bar.
        cache_factory: ``() -> transformers Cache``: each window runs with a fresh cache passed
            as ``past_key_values`` (e.g. a 4-bit KV cache, so attention reads K/V as the cache
            stores them); None (default): ``use_cache=False``.
    Returns:
        dict(ppl float, nll float (mean per scored token), n_tokens int (scored tokens),
        n_windows int, seqlen int).
    """
    if seqlen is None:
        seqlen = min(2048, _max_positions(model) or 2048)
    for name, v, lo in (("seqlen", seqlen, 2), ("batch_size", batch_size, 1)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    for name, v in (("max_windows", max_windows), ("max_tokens", max_tokens)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"{name} must be None or an int >= 1, got {v!r}")
    mp = _max_positions(model)
    if mp is not None and seqlen > mp:
        raise ValueError(f"seqlen={seqlen} exceeds the model's max_position_embeddings={mp}")
    if text is None:
        text = wikitext2_text(split)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    starts = list(range(0, ids.numel() - 1, seqlen))   # a last window of 1 token scores nothing
    if max_windows is not None:
        starts = starts[:max_windows]
    if not starts:
        raise ValueError(f"the text has only {ids.numel()} tokens: nothing to score")
    device = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    full = [s for s in starts if s + seqlen <= ids.numel()]
    calls = [full[i:i + batch_size] for i in range(0, len(full), batch_size)]
    calls += [[s] for s in starts if s + seqlen > ids.numel()]
    nll, count = 0.0, 0
    bar = tqdm(total=len(starts), desc=f"perplexity (seqlen {seqlen})", disable=not progress)
    try:
        for call in calls:
            x = torch.stack([ids[s:s + seqlen] for s in call]).to(device)
            if cache_factory is None:
                logits = model(input_ids=x, use_cache=False).logits.float()
            else:
                logits = model(input_ids=x, past_key_values=cache_factory(),
                               use_cache=True).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            tgt = x[:, 1:]
            nll += float(-logp.gather(-1, tgt.unsqueeze(-1)).sum(dtype=torch.float64))
            count += tgt.numel()
            bar.update(len(call))
    finally:
        bar.close()
        model.train(was_training)
    mean = nll / count
    return {"ppl": math.exp(mean), "nll": mean, "n_tokens": count, "n_windows": len(starts),
            "seqlen": seqlen}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def tokens_per_second(model: nn.Module, *, prompt_len: int = 512, new_tokens: int = 64,
                      batch_size: int = 1, vocab_size: int | None = None, device=None,
                      warmup: int = 1, repeats: int = 3, seed: int = 0) -> dict:
    """Prefill and decode throughput with random token ids (greedy, KV cache).

    prefill: one forward over (batch_size, prompt_len) tokens;
    decode: `new_tokens` single-token steps with the KV cache after that prefill.
    Best (shortest) of `repeats` timed runs after `warmup` untimed ones.

    Returns:
        dict(prefill_tok_s, decode_tok_s, prefill_s, decode_s, prompt_len, new_tokens,
        batch_size) -- tokens counted over the whole batch.
    """
    for name, v, lo in (("prompt_len", prompt_len, 1), ("new_tokens", new_tokens, 1),
                        ("batch_size", batch_size, 1), ("warmup", warmup, 0),
                        ("repeats", repeats, 1)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    device = torch.device(device) if device is not None else _model_device(model)
    vocab = vocab_size or getattr(getattr(model, "config", None), "vocab_size", None)
    if not vocab:
        raise ValueError("vocab_size is needed (model.config.vocab_size is missing)")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (batch_size, prompt_len), generator=gen).to(device)
    model.eval()

    def run() -> tuple[float, float]:
        _sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=x, use_cache=True)
        _sync(device)
        t1 = time.perf_counter()
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(new_tokens):
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync(device)
        return t1 - t0, time.perf_counter() - t1

    for _ in range(warmup):
        run()
    times = [run() for _ in tqdm(range(repeats), desc="tokens/s", leave=False)]
    prefill_s = min(t[0] for t in times)
    decode_s = min(t[1] for t in times)
    return {"prefill_tok_s": batch_size * prompt_len / prefill_s,
            "decode_tok_s": batch_size * new_tokens / decode_s, "prefill_s": prefill_s,
            "decode_s": decode_s, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "batch_size": batch_size}


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as stored: `weight_nbytes()` of every mixq quantized linear
    (packed int4 + scales + FP16 outliers + bias, not the unpacked int8 copy) plus every other
    parameter and buffer at its dtype, each shared tensor (tied embeddings) counted once."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    total = 0
    seen = {id(b) for name, b in model.named_buffers() if "inv_freq" in name}  # RoPE constants
    quantized = [m for m in model.modules() if isinstance(m, QuantLinearBase)]
    inside = set()
    for m in quantized:
        total += m.weight_nbytes()
        inside |= {id(t) for t in m.buffers()} | {id(t) for t in m.parameters()}
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in inside or id(t) in seen or not t.is_floating_point():
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total

