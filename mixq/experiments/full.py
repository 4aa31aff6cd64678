"""Full-architecture W4A4: the steps after linear-layer quantization, each measured on its own.

After `mixq.quantize` has made every q/k/v/o/gate/up/down linear W4A4, three floating-point
parts of a decoder layer remain. The steps, cumulative, as rows of ``results/full_<model>.json``:

    (a) "linear"  W4A4 linears only (`mixq.quantize`).
    (b) "kv4"     + K and V read back as a 4-bit KV cache stores them (`mixq.kv_cache.KV4Cache`:
                  K per channel over groups of `kv_group` tokens, KIVI-style; V per token).
    (c) "attn"    + quantized attention matmuls (`mixq.attention`): Q, K, V symmetric per head
                  and token (int8 by default) so Q K^T runs on integers, softmax in fp32,
                  P as unsigned 8-bit codes for P V.
    (d) "norm"    + RMSNorm/LayerNorm fused with the activation quantization of the next linear
                  (`mixq.norm.fuse_norm_quant`). The fused kernel feeds the W4A4 *kernel* path;
                  its codes equal ``act_quant(norm(x))`` (tests), so off the kernel path (CPU)
                  the step changes nothing and `step_perplexities` reports it as not measured.

Perplexity with a cache: each WikiText-2 window runs with a fresh cache (`mixq.eval.perplexity`
``cache_factory``), so attention reads K/V through the cache's quantization. `StoredKV4Cache`
makes the cache hand back its dequantized K/V also when mixq attention is on (which otherwise
reads the packed cache directly, a decode-time path), so step (c) sees KV4 values too.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mixq.attention import AttentionQuantConfig, enable_quantized_attention
from mixq.eval import perplexity
from mixq.kv_cache import KV4Cache

__all__ = ["STEPS", "FullW4A4Config", "StoredKV4Cache", "float_kv_bytes", "kv4_bytes",
           "step_perplexities"]

STEPS: tuple[str, ...] = ("linear", "kv4", "attn", "norm")


@dataclass(frozen=True)
class FullW4A4Config:
    """Settings of steps (b)-(d) (module docstring).

    Args:
        kv_bits: bits of the cached K/V (4; 8 allowed).
        kv_group: tokens per K scale group of the cache.
        attention: quantization of the attention matmuls in step (c).
    """

    kv_bits: int = 4
    kv_group: int = 32
    attention: AttentionQuantConfig = AttentionQuantConfig(q_bits=8, k_bits=8, v_bits=8, p_bits=8)

    def __post_init__(self) -> None:
        if self.kv_bits not in (4, 8):
            raise ValueError(f"kv_bits must be 4 or 8, got {self.kv_bits!r}")
        if not isinstance(self.kv_group, int) or self.kv_group < 1:
            raise ValueError(f"kv_group must be a positive int, got {self.kv_group!r}")
        if not isinstance(self.attention, AttentionQuantConfig):
            raise TypeError(f"attention must be an AttentionQuantConfig, "
                            f"got {type(self.attention).__name__}")


class StoredKV4Cache(KV4Cache):
    """A `KV4Cache` whose `update` always returns the dequantized K/V (all tokens so far).

    Used to *measure* the accuracy of 4-bit K/V storage in a full-sequence forward: attention
    (eager or mixq) then reads exactly the values a decode step would read from the cache.
    """

    @property
    def packed_reads(self) -> bool:
        return False

    @packed_reads.setter
    def packed_reads(self, value: bool) -> None:   # mixq attention's hook sets it; ignored
        pass


def _cache_factory(model: nn.Module, cfg: FullW4A4Config):
    return lambda: StoredKV4Cache(model.config, bits=cfg.kv_bits, group_size=cfg.kv_group,
                                  check_finite=False)


@torch.no_grad()
def kv4_bytes(model: nn.Module, seqlen: int, cfg: FullW4A4Config = FullW4A4Config()) -> int:
    """Bytes of a `KV4Cache` holding `seqlen` tokens of batch 1 (one forward of random ids)."""
    dev = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (1, seqlen), device=dev)
    cache = KV4Cache(model.config, bits=cfg.kv_bits, group_size=cfg.kv_group, check_finite=False)
    model(input_ids=ids, past_key_values=cache, use_cache=True)
    return int(cache.kv_bytes())


def float_kv_bytes(model: nn.Module, seqlen: int, dtype: torch.dtype = torch.float16) -> int:
    """Bytes of a float (default fp16) KV cache of `seqlen` tokens, batch 1:
    ``2 (K, V) * layers * kv_heads * head_dim * seqlen * itemsize``."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * c.num_hidden_layers * kv_heads * head_dim * seqlen * itemsize


def step_perplexities(model: nn.Module, tokenizer, *, cfg: FullW4A4Config = FullW4A4Config(),
                      steps: tuple[str, ...] = STEPS, progress: bool = True,
                      **ppl_kwargs) -> list[dict]:
    """Apply steps (b)-(d) cumulatively to a W4A4-quantized `model` and score each.

    Args:
        model: a causal LM already quantized by `mixq.quantize` (step (a)); modified in place
            (quantized attention stays enabled afterwards).
        tokenizer: its tokenizer.
        cfg: step settings.
        steps: which of `STEPS` to score (in `STEPS` order; each includes the ones before).
        ppl_kwargs: forwarded to `mixq.eval.perplexity` (seqlen, max_windows, ...).
    Returns:
        one dict per step: ``config`` (step name), ``ppl`` (None where not measured, with
        ``note``), ``nll``, ``n_tokens``, ``kv_bytes`` (cache bytes at the window length,
        batch 1), ``backend`` ("kernels" on CUDA, "reference" elsewhere).
    """
    bad = [s for s in steps if s not in STEPS]
    if bad:
        raise ValueError(f"unknown steps {bad}; choose from {STEPS}")
    dev = next(model.parameters()).device
    seqlen = ppl_kwargs.get("seqlen") or min(2048, model.config.max_position_embeddings)
    ppl_kwargs = {**ppl_kwargs, "seqlen": seqlen, "progress": progress}
    kv_fp16 = float_kv_bytes(model, seqlen)
    kv_q = kv4_bytes(model, seqlen, cfg)
    rows = []
    for i, step in enumerate(STEPS):
        if step == "attn":
            enable_quantized_attention(model, cfg.attention)
        if step == "norm" and dev.type == "cuda":
            from mixq.norm import fuse_norm_quant
            fuse_norm_quant(model)
        if step not in steps:
            continue
        row = {"config": step, "kv_bytes": kv_q if i >= 1 else kv_fp16,
               "backend": "kernels" if dev.type == "cuda" else "reference"}
        if step == "norm" and dev.type != "cuda":
            row.update(ppl=None, note="fused norm quant runs on the CUDA kernel path only; "
                                      "its codes equal act_quant(norm(x)) (tests), so on the "
                                      "reference path it equals step 'attn'")
        else:
            factory = _cache_factory(model, cfg) if i >= 1 else None
            row.update(perplexity(model, tokenizer, cache_factory=factory, **ppl_kwargs))
        rows.append(row)
    return rows


def run_full(model_name: str, linear_config: str, *, n_calib: int = 128, calib_seqlen: int = 2048,
             max_windows: int | None = None, device=None, cfg: FullW4A4Config = FullW4A4Config(),
             json_path=None, progress: bool = True) -> list[dict]:
    """Rows of ``results/full_<model>.json``: FP16, then steps (a)-(d) on `linear_config`.

    Args:
        model_name: anything `mixq.llm.load_model` takes ("smollm2", "stories260k", ...).
        linear_config: a `mixq.sweep.CONFIGS` name for step (a), e.g. "w4a4-o1+rotation+gptq".
        n_calib, calib_seqlen: calibration windows of WikiText-2 valid.
        max_windows: score only the first windows of WikiText-2 test (None: the full split).
        device: default CUDA when present (fp16 model there, fp32 on CPU).
        json_path: written (a JSON list) after every row, with ``<stem>.meta.json`` beside it.
    Returns:
        rows with model, config, linear_config, ppl, ppl_fp16, ppl_ratio, kv_bytes, n_tokens,
        backend (+ device and versions).
    """
    import time

    from mixq.api import quantize
    from mixq.calibrate import calibration_batches
    from mixq.llm import load_model
    from mixq.sweep import CONFIGS, _environment, _write

    by_name = {c.name: c for c in CONFIGS}
    if linear_config not in by_name:
        raise ValueError(f"unknown linear config {linear_config!r}; one of {sorted(by_name)}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    env = _environment(device)
    model, tok = load_model(model_name, dtype=dtype, device=device)
    seqlen = min(2048, getattr(model.config, "max_position_embeddings", 2048) or 2048)
    common = {"model": model_name, "linear_config": linear_config, "n_calib": n_calib,
              "calib_seqlen": min(calib_seqlen, seqlen), "max_windows": max_windows, **env}
    rows: list[dict] = []

    meta = {**common, "kv_bits": cfg.kv_bits, "kv_group": cfg.kv_group,
            "attention": {k: getattr(cfg.attention, k) for k in ("q_bits", "k_bits", "v_bits", "p_bits")},
            "seqlen": seqlen, "steps": list(STEPS)}

    def write() -> None:   # the sweep's writer: atomic JSON list + <stem>.meta.json
        _write(json_path, None, rows, {**meta, "written": time.strftime("%F %T")})

    fp = perplexity(model, tok, seqlen=seqlen, max_windows=max_windows, progress=progress)
    rows.append({"config": "fp16", "ppl_fp16": fp["ppl"], **fp, "ppl_ratio": 1.0,
                 "kv_bytes": float_kv_bytes(model, seqlen), **common})
    write()
    calib = calibration_batches(tok, n_samples=n_calib, seqlen=min(calib_seqlen, seqlen))
    quantize(model, by_name[linear_config].build(), calib, device=device, progress=progress)
    for row in step_perplexities(model, tok, cfg=cfg, seqlen=seqlen, max_windows=max_windows,
                                 progress=progress):
        ppl = row.get("ppl")
        rows.append({**row, "ppl_fp16": fp["ppl"],
                     "ppl_ratio": None if ppl is None else ppl / fp["ppl"], **common})
        write()
        if progress:
            print(f"[full] {row['config']}: ppl {ppl}", flush=True)
    return rows


def main(argv=None) -> int:
    """``python -m mixq full --model smollm2 --linear w4a4-o1+rotation+gptq --json PATH``."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m mixq full", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="smollm2 | stories260k | HF id or path")
    p.add_argument("--linear", required=True, help="a mixq.sweep config name for step (a)")
    p.add_argument("--json", default=None, help="rows (JSON list), rewritten after each row")
    p.add_argument("--n-calib", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None, help="score only the first windows")
    p.add_argument("--device", default=None)
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    run_full(a.model, a.linear, n_calib=a.n_calib, calib_seqlen=a.calib_seqlen,
             max_windows=a.max_windows, device=a.device, json_path=a.json, progress=not a.quiet)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
