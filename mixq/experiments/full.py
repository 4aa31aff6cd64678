"""Full-architecture W4A4 (``python -m mixq full``): the steps after linear-layer quantization,
each measured on its own (results/full_<model>.json).

``python -m mixq full --model smollm2 --linear w4a4-o1+rotation+gptq --json PATH``

After `mixq.quantize` has made every q/k/v/o/gate/up/down linear W4A4 with the linear recipe
(a preset name), three floating-point parts of a decoder layer remain. The steps, cumulative,
are that preset with the full-architecture suffixes of `mixq.presets.STEPS` (rows of the file):

    (a) "linear"  <recipe>                 W4A4 linears only.
    (b) "kv4"     <recipe>+kv4             + K and V read back as the 4-bit KV cache stores them
                                           (`mixq.presets.KV4`: K per channel over groups of
                                           32 tokens, KIVI-style; V per token).
    (c) "attn"    <recipe>+kv4+attn        + quantized attention matmuls
                                           (`mixq.presets.INT8_ATTENTION`: Q, K, V int8 per
                                           head and token, softmax in fp32, P uint8).
    (d) "norm"    <recipe>+kv4+attn+norm   + RMSNorm/LayerNorm fused with the activation
                                           quantization of the next linear. The fused kernel
                                           feeds the W4A4 *kernel* path; its codes equal
                                           ``act_quant(norm(x))`` (tests), so off the kernel
                                           path (CPU) the step changes nothing and is reported
                                           as not measured.

The model is quantized once (every step has the same linears); each step then switches its
parts on (`mixq.api.apply_full_architecture` with the step's preset). Perplexity with a cache:
each WikiText-2 window runs with a fresh ``mixq.make_cache(model, check_finite=False,
dequantized_reads=True)`` (`mixq.experiments.common.kv_cache_factory`), so the full-sequence
forward reads the 4-bit K/V exactly as a decode step would read them from the cache.
"""
from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from mixq import presets
from mixq.api import CONFIG_ATTR, apply_full_architecture, make_cache
from mixq.eval import perplexity
from mixq.experiments.common import (add_common_flags, command_parser, default_device, environment,
                                     kv_cache_factory, now, torch_dtype, write_results)

__all__ = ["STEPS", "step_presets", "float_kv_bytes", "kv_cache_bytes", "step_perplexities",
           "run_full", "build_parser", "main"]

#: The rows of a full run after FP16: the linear recipe, then each full-architecture step.
STEPS: tuple[str, ...] = ("linear", *presets.STEPS)

_NORM_NOTE = ("fused norm quant runs on the CUDA kernel path only; its codes equal "
              "act_quant(norm(x)) (tests), so on the reference path it equals step 'attn'")


def step_presets(linear: str) -> list[tuple[str, str]]:
    """``[(step, preset name), ...]`` of the linear recipe `linear`: ``("linear", linear)``,
    ``("kv4", linear + "+kv4")``, ``("attn", linear + "+kv4+attn")``, ``("norm", ...)``.

    Raises:
        ValueError: `linear` is not a key of `mixq.presets.PRESETS` (a name with steps is not a
            linear recipe).
    """
    if linear not in presets.PRESETS:
        raise ValueError(f"unknown linear preset {linear!r}: give a key of mixq.presets.PRESETS "
                         f"without full-architecture steps; known: {presets.preset_names()}")
    names = [linear]
    for step in presets.STEPS:
        names.append(f"{names[-1]}+{step}")
    return list(zip(STEPS, names))


def float_kv_bytes(model: nn.Module, seqlen: int, dtype: torch.dtype = torch.float16) -> int:
    """Bytes of a float (default fp16) KV cache of `seqlen` tokens, batch 1:
    ``2 (K, V) * layers * kv_heads * head_dim * seqlen * itemsize``."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * c.num_hidden_layers * kv_heads * head_dim * seqlen * itemsize


@torch.no_grad()
def kv_cache_bytes(model: nn.Module, seqlen: int) -> int:
    """Bytes of the KV cache of a quantized `model` (`mixq.make_cache`) holding `seqlen` tokens
    of batch 1 (one forward of random ids); `float_kv_bytes` when its config has no KV cache."""
    cache = make_cache(model, check_finite=False)
    if cache is None:
        return float_kv_bytes(model, seqlen)
    dev = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (1, seqlen), device=dev)
    model(input_ids=ids, past_key_values=cache, use_cache=True)
    return int(cache.kv_bytes())


def _switch_to(model: nn.Module, config) -> None:
    """Make `config` the model's quantization config and switch on its full-architecture parts
    (the linears stay as they are: every step shares them)."""
    setattr(model, CONFIG_ATTR, config)
    apply_full_architecture(model, config)


def step_perplexities(model: nn.Module, tokenizer, linear: str, *,
                      steps: tuple[str, ...] = STEPS, progress: bool = True,
                      **ppl_kwargs) -> list[dict]:
    """Apply steps (b)-(d) cumulatively to `model`, quantized with the preset `linear`, and
    score each.

    Args:
        model: a causal LM quantized by ``mixq.quantize(model, mixq.preset(linear), ...)``
            (step (a)); modified in place: it ends with the last step's config (quantized
            attention on).
        tokenizer: its tokenizer.
        linear: the linear recipe, a key of `mixq.presets.PRESETS`.
        steps: which of `STEPS` to score (each includes the ones before).
        ppl_kwargs: forwarded to `mixq.eval.perplexity` (seqlen, max_windows, ...).
    Returns:
        one dict per step: ``config`` (step name), ``preset`` (its preset name), ``ppl`` (None
        where not measured, with ``note``), ``nll``, ``n_tokens``, ``kv_bytes`` (cache bytes
        at the window length, batch 1), ``backend`` ("kernels" on CUDA, "reference" elsewhere).
    Raises:
        ValueError: unknown steps or linear preset; `model` not quantized with that preset.
    """
    bad = [s for s in steps if s not in STEPS]
    if bad:
        raise ValueError(f"unknown steps {bad}; choose from {STEPS}")
    plan = step_presets(linear)
    if getattr(model, CONFIG_ATTR, None) != presets.preset(linear):
        raise ValueError(f"model must be quantized with the preset {linear!r}: "
                         f"mixq.quantize(model, mixq.preset({linear!r}), calib)")
    dev = next(model.parameters()).device
    seqlen = ppl_kwargs.get("seqlen") or min(2048, model.config.max_position_embeddings)
    ppl_kwargs = {**ppl_kwargs, "seqlen": seqlen, "progress": progress}
    kv_bytes: dict = {}                 # KV cache spec -> bytes (one forward per spec)
    rows = []
    for step, name in plan:
        config = presets.preset(name)
        measured = step != "norm" or dev.type == "cuda"
        if measured:
            _switch_to(model, config)
        if config.kv_cache not in kv_bytes:
            kv_bytes[config.kv_cache] = kv_cache_bytes(model, seqlen)
        if step not in steps:
            continue
        row = {"config": step, "preset": name, "kv_bytes": kv_bytes[config.kv_cache],
               "backend": "kernels" if dev.type == "cuda" else "reference"}
        row.update(perplexity(model, tokenizer, cache_factory=kv_cache_factory(model),
                              **ppl_kwargs) if measured else {"ppl": None, "note": _NORM_NOTE})
        rows.append(row)
    return rows


def run_full(model_name: str, linear: str, *, n_calib: int = 128, calib_seqlen: int = 2048,
             max_windows: int | None = None, device=None, dtype=None, json_path=None,
             progress: bool = True) -> tuple[list[dict], dict]:
    """Rows of ``results/full_<model>.json``: FP16, then steps (a)-(d) on the preset `linear`.

    Args:
        model_name: anything `mixq.io.load_model` takes ("smollm2", "stories260k", ...).
        linear: the linear recipe for step (a), a key of `mixq.presets.PRESETS`, e.g.
            "w4a4-o1+rotation+gptq".
        n_calib, calib_seqlen: calibration windows of WikiText-2 valid.
        max_windows: score only the first windows of WikiText-2 test (None: the full split).
        device: default CUDA when present. dtype: of the float model (default fp16 on CUDA,
            fp32 on CPU).
        json_path: written after every row (`mixq.experiments.common.write_results`).
    Returns:
        ``(rows, meta)``: rows with model, config (fp16 or the step), preset, linear_config,
        ppl, ppl_fp16, ppl_ratio, kv_bytes, n_tokens, backend and the environment.
    Raises:
        ValueError: unknown linear preset (before anything is loaded).
    """
    from mixq.api import quantize
    from mixq.calibrate import calibration_batches
    from mixq.io import load_model

    plan = step_presets(linear)
    device = default_device(device)
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    model, tok = load_model(model_name, dtype=dtype, device=device)
    seqlen = min(2048, getattr(model.config, "max_position_embeddings", 2048) or 2048)
    common = {"model": model_name, "linear_config": linear, "n_calib": n_calib,
              "calib_seqlen": min(calib_seqlen, seqlen), "max_windows": max_windows,
              **environment(device)}
    meta = {**common, "seqlen": seqlen, "steps": list(STEPS), "presets": [n for _, n in plan],
            "kv_cache": presets.KV4.to_dict(),
            "attention": dataclasses.asdict(presets.INT8_ATTENTION)}
    rows: list[dict] = []

    def write() -> None:
        if json_path:
            write_results(json_path, rows, {**meta, "written": now()})

    fp = perplexity(model, tok, seqlen=seqlen, max_windows=max_windows, progress=progress)
    rows.append({"config": "fp16", "ppl_fp16": fp["ppl"], **fp, "ppl_ratio": 1.0,
                 "kv_bytes": float_kv_bytes(model, seqlen), **common})
    write()
    calib = calibration_batches(tok, n_samples=n_calib, seqlen=min(calib_seqlen, seqlen))
    quantize(model, presets.preset(linear), calib, device=device, progress=progress)
    for row in step_perplexities(model, tok, linear, seqlen=seqlen, max_windows=max_windows,
                                 progress=progress):
        ppl = row.get("ppl")
        rows.append({**row, "ppl_fp16": fp["ppl"],
                     "ppl_ratio": None if ppl is None else ppl / fp["ppl"], **common})
        write()
        print(f"[full] {row['config']} ({row['preset']}): ppl {ppl}", flush=True)
    return rows, meta


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``python -m mixq full``."""
    p = command_parser("full", "perplexity after each full-architecture W4A4 step "
                               "(linear, +kv4, +attn, +norm)")
    add_common_flags(p, "model", "device", "dtype", "json", "quiet", model={"required": True})
    p.add_argument("--linear", required=True,
                   help="the linear recipe: a preset name (python -m mixq sweep --list), "
                        "e.g. w4a4-o1+rotation+gptq")
    p.add_argument("--n-calib", type=int, default=128, help="calibration windows")
    p.add_argument("--calib-seqlen", type=int, default=2048, help="tokens per calibration window")
    p.add_argument("--max-windows", type=int, default=None, help="score only the first windows")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mixq full ...``; returns the exit code."""
    p = build_parser()
    args = p.parse_args(argv)
    try:
        step_presets(args.linear)
    except ValueError as e:
        p.error(str(e))
    run_full(args.model, args.linear, n_calib=args.n_calib, calib_seqlen=args.calib_seqlen,
             max_windows=args.max_windows, device=args.device,
             dtype=torch_dtype(args.dtype) if args.dtype else None, json_path=args.json,
             progress=not args.quiet)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
