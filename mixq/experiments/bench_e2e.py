"""End-to-end benchmark: a Hugging Face Llama in bf16 against the same model with mixq linears.

``python -m mixq bench e2e [--models llama3-8b,smollm2] [--modes bf16,w4a16,w4a4,w4a4-o1,w4a4-o1-kv4]
[--layers N] [--prompt-len 2048] [--decode-prompt-len 128] [--new-tokens 64] [--batches 1,16]
[--static-cache] [--compile] [--json PATH] [--smoke]`` (the CLI passes ``argv = ["e2e", ...]``).

Models:

* ``llama3-8b``: `transformers.LlamaConfig` with the real Llama-3-8B sizes (hidden 4096, MLP
  14336, 32 query / 8 KV heads, 32 layers, vocab 128256) and random weights, built in the bench
  dtype directly on the device (no fp32 copy). ``--layers N`` keeps N decoder layers; rows then
  also carry ``tokens_per_s_full_est = tokens_per_s * N / 32``, a lower bound for the full model
  (the embedding and lm_head, whose cost does not grow with depth, are scaled too).
* ``smollm2``: SmolLM2-135M through `mixq.llm.load_model` (staged GGUF).
* ``tiny``: a 2-layer, hidden-128 Llama: the CPU smoke configuration used by the tests.

Modes (each on a fresh copy of the model; weights from the same seed):

====================  ====================================================================
bf16                  the Hugging Face model as built (``--dtype``, bf16 on a GPU)
w4a16                 ``mixq.quantize(model, QuantConfig(mode="w4a16"))``: int4 g128 weights
w4a4                  ``QuantConfig(mode="w4a4")``: int4 g128 weights x int4 per-token activations
w4a4-o1               the same with 1% FP16 outlier channels, ranked by weight magnitude
                      (``outlier_strategy="max"``: no calibration data needed)
w4a4-o1-kv4           w4a4-o1 with `mixq.kv_cache.KV4Cache` (4-bit KV cache) and, when
                      `mixq.attention.enable_quantized_attention` exists, mixq's attention
                      reading the packed cache (row key ``attention``); left out, with a
                      note, when mixq.kv_cache does not exist
====================  ====================================================================

Quantization runs without calibration data (RTN), so the numbers are about speed and memory,
not accuracy. Phases (random token ids, greedy):

* ``prefill``: one forward over (1, prompt_len) tokens with ``logits_to_keep=1``; tokens/s =
  prompt_len / seconds.
* ``decode``: ``model.generate`` of n + 1 tokens minus the same with 1 token, after a prompt of
  ``decode_prompt_len`` tokens, at each batch size: tokens/s = batch * n / seconds, i.e. the
  decode steps only.

Same setup on both sides: ``--static-cache`` uses HF's static KV cache
(``cache_implementation="static"``); ``--compile`` lets HF's generate compile the decode step
(``disable_compile=False``, which needs a static cache) and wraps the prefill forward in
``torch.compile``; without it compilation is disabled everywhere. Times are the best of
``--repeats`` runs after one warm-up; ``peak_mem_bytes`` is ``torch.cuda.max_memory_allocated``
over the phase (reset before it; None on a CPU); ``weight_bytes`` is `mixq.eval.weight_bytes`.

Output: rows (flat list) to ``results/e2e_<device>.json`` (e.g. ``e2e_h100.json``; smoke runs
write only with ``--json``), meta (device name, torch / triton / transformers versions, the
setup) to ``<stem>.meta.json`` beside it; each row has ``model``, ``mode``, ``phase``,
``batch``, ``tokens_per_s``, ``peak_mem_bytes`` (and ``error`` when it could not run).
"""
from __future__ import annotations

import argparse
import gc
import inspect
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from mixq.eval import _model_device, _sync

__all__ = ["MODELS", "MODES", "LLAMA3_8B", "TINY_LLAMA", "REQUIRED_ROW_KEYS", "device_slug",
           "build_model", "quant_config", "kv4_cache_factory", "measure_prefill",
           "measure_decode", "run_e2e", "parse_args", "main"]

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                 num_key_value_heads=8, num_hidden_layers=32, vocab_size=128256,
                 max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                 tie_word_embeddings=False)
"""Llama-3-8B sizes (meta-llama/Meta-Llama-3-8B config.json)."""

TINY_LLAMA = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4,
                  num_key_value_heads=2, num_hidden_layers=2, vocab_size=512,
                  max_position_embeddings=512, tie_word_embeddings=False)
"""The smoke model: same architecture, a few hundred thousand parameters."""

MODELS = ("llama3-8b", "smollm2", "tiny")
MODES = ("bf16", "w4a16", "w4a4", "w4a4-o1", "w4a4-o1-kv4")
REQUIRED_ROW_KEYS = ("model", "mode", "phase", "batch", "tokens_per_s", "peak_mem_bytes")
_RANDOM_MODELS = {"llama3-8b": LLAMA3_8B, "tiny": TINY_LLAMA}


# ------------------------------------------------------------------------------------ helpers
def device_slug(name: str) -> str:
    """Short file-name tag of a device name: ``"NVIDIA H100 80GB HBM3"`` -> ``"h100"``,
    ``"cpu"`` -> ``"cpu"``; otherwise the name lower-cased with non-alphanumerics as ``_``."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"device name must be a non-empty str, got {name!r}")
    m = re.search(r"\b([A-Z]{1,2}\d{2,3}[A-Za-z]?)\b", name)
    if m:
        return m.group(1).lower()
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def build_model(name: str, *, layers: int | None = None, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> tuple[nn.Module, int]:
    """``(model in eval mode, full layer count)`` of a benchmark model.

    Args:
        name: one of `MODELS`.
        layers: keep only this many decoder layers (random models: built with that many;
            smollm2: the first ones kept); None: all.
        device: where the weights are created (random models are initialized there directly).
        dtype: floating dtype of the weights.
        seed: torch seed of the random weights.
    Raises:
        ValueError: unknown name, layers < 1 or above the model's count.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {MODELS}")
    if layers is not None and (isinstance(layers, bool) or not isinstance(layers, int) or layers < 1):
        raise ValueError(f"layers must be None or an int >= 1, got {layers!r}")
    device = torch.device(device)
    if name == "smollm2":
        from mixq.llm import load_model
        model, _ = load_model("smollm2", dtype=dtype, device=device)
        full = model.config.num_hidden_layers
        if layers is not None:
            if layers > full:
                raise ValueError(f"smollm2 has {full} layers, asked for {layers}")
            model.model.layers = model.model.layers[:layers]
            model.config.num_hidden_layers = layers
        return model.eval(), full
    from transformers import LlamaConfig, LlamaForCausalLM

    sizes = dict(_RANDOM_MODELS[name])
    full = sizes["num_hidden_layers"]
    if layers is not None:
        if layers > full:
            raise ValueError(f"{name} has {full} layers, asked for {layers}")
        sizes["num_hidden_layers"] = layers
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)            # no fp32 copy of an 8B model on the way
    try:
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**sizes))
    finally:
        torch.set_default_dtype(previous)
    return model.eval(), full


def quant_config(mode: str):
    """The `mixq.config.QuantConfig` of a mode (None for "bf16"); the kv4 mode uses w4a4-o1's."""
    from mixq.config import QuantConfig

    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")
    if mode == "bf16":
        return None
    if mode == "w4a16":
        return QuantConfig(mode="w4a16")
    if mode == "w4a4":
        return QuantConfig(mode="w4a4")
    return QuantConfig(mode="w4a4", outlier_frac=0.01, outlier_strategy="max")


def kv4_cache_factory(model: nn.Module) -> Callable[[int, int], object] | None:
    """``make(batch, max_len) -> cache`` building a `mixq.kv_cache.KV4Cache` for `model`, or
    None when mixq.kv_cache (or KV4Cache in it) does not exist. Keyword arguments are passed
    by name when KV4Cache's constructor has them: config, max_cache_len / max_len,
    max_batch_size / batch_size, device, dtype."""
    try:
        from mixq import kv_cache
    except ImportError:
        return None
    cls = getattr(kv_cache, "KV4Cache", None)
    if cls is None:
        return None
    params = inspect.signature(cls).parameters
    device, dtype = _model_device(model), next(model.parameters()).dtype

    def make(batch: int, max_len: int):
        offer = {"config": model.config, "max_cache_len": max_len, "max_len": max_len,
                 "max_batch_size": batch, "batch_size": batch, "device": device, "dtype": dtype}
        return cls(**{k: v for k, v in offer.items() if k in params})
    return make


def _enable_quantized_attention(model: nn.Module) -> str:
    """Switch `model` to mixq's attention (which reads the packed KV4 codes) when
    mixq.attention.enable_quantized_attention exists; returns "mixq" or "hf" (then the KV4
    cache hands dequantized keys/values to HF's attention)."""
    try:
        from mixq.attention import enable_quantized_attention
    except ImportError:
        return "hf"
    enable_quantized_attention(model)
    return "mixq"


def _check_ints(**values) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")


def _best_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()                                                  # warm-up (compilation, autotune)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


@torch.no_grad()
def measure_prefill(model: nn.Module, *, prompt_len: int, batch: int = 1, repeats: int = 3,
                    compile: bool = False, seed: int = 0) -> dict:
    """Prefill throughput: one forward over (batch, prompt_len) random ids, last logits only.

    Returns:
        dict(tokens_per_s = batch * prompt_len / seconds, seconds (best of `repeats`),
        peak_mem_bytes (CUDA, over the timed calls; None on CPU)).
    """
    _check_ints(prompt_len=prompt_len, batch=batch, repeats=repeats)
    device = _model_device(model)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=gen).to(device)
    fwd = torch.compile(model) if compile else model
    _reset_peak(device)
    s = _best_seconds(lambda: fwd(input_ids=x, use_cache=False, logits_to_keep=1), device, repeats)
    return {"tokens_per_s": batch * prompt_len / s, "seconds": s, "peak_mem_bytes": _peak(device)}


@torch.no_grad()
def measure_decode(model: nn.Module, *, prompt_len: int, new_tokens: int, batch: int,
                   repeats: int = 3, static_cache: bool = False, compile: bool = False,
                   cache_factory: Callable[[int, int], object] | None = None,
                   seed: int = 0) -> dict:
    """Decode throughput with ``model.generate`` (greedy, exactly the asked token counts).

    decode seconds = t(generate new_tokens + 1) - t(generate 1): the `new_tokens` single-token
    steps after the prefill (each time the best of `repeats`).

    Args:
        prompt_len, new_tokens, batch, repeats: ints >= 1.
        static_cache: HF static KV cache. compile: let generate compile the decode step.
        cache_factory: ``make(batch, max_len) -> Cache`` passed as ``past_key_values`` (e.g.
            `kv4_cache_factory`); overrides static_cache.
    Returns:
        dict(tokens_per_s = batch * new_tokens / seconds, seconds, peak_mem_bytes).
    """
    _check_ints(prompt_len=prompt_len, new_tokens=new_tokens, batch=batch, repeats=repeats)
    device = _model_device(model)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=gen).to(device)
    mask = torch.ones_like(x)

    def generate(n: int):
        kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                  disable_compile=not compile)
        if cache_factory is not None:
            kw["past_key_values"] = cache_factory(batch, prompt_len + n)
        elif static_cache:
            kw["cache_implementation"] = "static"
        return model.generate(x, attention_mask=mask, **kw)

    _reset_peak(device)
    t_one = _best_seconds(lambda: generate(1), device, repeats)
    t_all = _best_seconds(lambda: generate(new_tokens + 1), device, repeats)
    s = max(t_all - t_one, 1e-9)       # clamp: on a tiny CPU model the difference can be noise
    return {"tokens_per_s": batch * new_tokens / s, "seconds": s, "peak_mem_bytes": _peak(device)}


# ------------------------------------------------------------------------------------- driver
def _environment(device: torch.device) -> dict:
    """`mixq.sweep`'s environment (device, device_name, torch, transformers, python) + triton."""
    from mixq.sweep import _environment as sweep_environment

    env = sweep_environment(device)
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def run_e2e(models: Sequence[str], modes: Sequence[str], *, layers: int | None = None,
            prompt_len: int = 2048, decode_prompt_len: int = 128, new_tokens: int = 64,
            batches: Sequence[int] = (1, 16), repeats: int = 3, static_cache: bool = False,
            compile: bool = False, device: str | torch.device | None = None,
            dtype: torch.dtype | None = None, json_path: str | Path | None = None,
            progress: bool = True) -> tuple[list[dict], dict]:
    """Benchmark every (model, mode): prefill at batch 1, decode at each batch size.

    Args:
        models: names from `MODELS`. modes: names from `MODES` ("w4a4-o1-kv4" is dropped, and
            noted in meta["skipped_modes"], when mixq.kv_cache.KV4Cache does not exist).
        layers: decoder layers kept (None: all); see the module docstring for the scaling.
        prompt_len: prefill tokens. decode_prompt_len, new_tokens: decode prompt and steps.
        batches: decode batch sizes. repeats: timed runs (best kept) after one warm-up.
        static_cache, compile: the cache / compile setup, the same for every mode.
        device: default cuda when available, else cpu. dtype: default bf16.
        json_path: rows and meta written there after every mode (None: not written).
        progress: tqdm bar over (model, mode).
    Returns:
        ``(rows, meta)``. A mode that fails (e.g. out of memory) gives rows with ``error``
        and ``tokens_per_s`` None; the run goes on.
    """
    from tqdm.auto import tqdm

    from mixq.api import quantize
    from mixq.eval import weight_bytes
    from mixq.sweep import _write as sweep_write

    bad = [m for m in models if m not in MODELS] + [m for m in modes if m not in MODES]
    if bad or not models or not modes:
        raise ValueError(f"models must be a non-empty subset of {MODELS} and modes of {MODES}; "
                         f"got models {list(models)}, modes {list(modes)}")
    _check_ints(prompt_len=prompt_len, decode_prompt_len=decode_prompt_len,
                new_tokens=new_tokens, repeats=repeats)
    if not batches:
        raise ValueError("batches must list at least one batch size")
    _check_ints(**{f"batches[{i}]": b for i, b in enumerate(batches)})
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or torch.bfloat16
    meta = {**_environment(device), "dtype": str(dtype).replace("torch.", ""),
            "static_cache": static_cache, "compile": compile, "layers": layers,
            "prompt_len": prompt_len, "decode_prompt_len": decode_prompt_len,
            "new_tokens": new_tokens, "batches": list(batches), "repeats": repeats,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "skipped_modes": []}
    modes = list(modes)
    if "w4a4-o1-kv4" in modes:
        try:
            from mixq import kv_cache
        except ImportError:
            kv_cache = None
        if not hasattr(kv_cache, "KV4Cache"):
            modes.remove("w4a4-o1-kv4")
            meta["skipped_modes"].append("w4a4-o1-kv4 (mixq.kv_cache.KV4Cache not available)")
    rows: list[dict] = []
    t_start = time.perf_counter()
    for name, mode in tqdm([(n, m) for n in models for m in modes], desc="e2e",
                           disable=not progress):
        base = {"model": name, "mode": mode, "layers": layers, "static_cache": static_cache,
                "compile": compile, "dtype": meta["dtype"], "device_name": meta["device_name"]}
        phases = [("prefill", 1)] + [("decode", b) for b in batches]
        model = None
        try:
            model, full = build_model(name, layers=layers, device=device, dtype=dtype)
            cfg = quant_config(mode)
            if cfg is not None:
                quantize(model, cfg, None, progress=False)
            wbytes = weight_bytes(model)
            factory = None
            if mode.endswith("kv4"):
                factory = kv4_cache_factory(model)
                base["attention"] = _enable_quantized_attention(model)
            for phase, batch in phases:
                row = {**base, "phase": phase, "batch": batch, "weight_bytes": wbytes,
                       "full_layers": full}
                try:
                    if phase == "prefill":
                        res = measure_prefill(model, prompt_len=prompt_len, batch=batch,
                                              repeats=repeats, compile=compile)
                        row["prompt_len"] = prompt_len
                    else:
                        res = measure_decode(model, prompt_len=decode_prompt_len,
                                             new_tokens=new_tokens, batch=batch, repeats=repeats,
                                             static_cache=static_cache, compile=compile,
                                             cache_factory=factory)
                        row.update(prompt_len=decode_prompt_len, new_tokens=new_tokens)
                    row.update(res)
                    n_layers = layers or full
                    row["tokens_per_s_full_est"] = res["tokens_per_s"] * n_layers / full
                except Exception as e:  # noqa: BLE001 - e.g. OOM at batch 16: keep going
                    row.update(tokens_per_s=None, peak_mem_bytes=None,
                               error=f"{type(e).__name__}: {str(e)[:200]}")
                rows.append(row)
                _free(device)
        except Exception as e:  # noqa: BLE001 - the model or its quantization failed
            rows += [{**base, "phase": p, "batch": b, "tokens_per_s": None,
                      "peak_mem_bytes": None, "error": f"{type(e).__name__}: {str(e)[:200]}"}
                     for p, b in phases]
        del model
        _free(device)
        meta["elapsed_s"] = round(time.perf_counter() - t_start, 2)
        if json_path:                  # atomic JSON + <stem>.meta.json beside it
            sweep_write(json_path, None, rows, meta)
    return rows, meta


def _format(rows: list[dict]) -> str:
    from mixq.report import markdown_table

    return markdown_table(rows, [("model", "model"), ("mode", "mode"), ("phase", "phase"),
                                 ("batch", "batch"), ("tokens/s", "tokens_per_s", ".1f"),
                                 ("peak MiB", lambda r: r.get("peak_mem_bytes")
                                  and r["peak_mem_bytes"] / 2**20, ".0f"),
                                 ("weights MiB", lambda r: r.get("weight_bytes")
                                  and r["weight_bytes"] / 2**20, ".1f"),
                                 ("error", lambda r: (r.get("error") or "")[:60])])


def _int_list(spec: str, what: str) -> list[int]:
    try:
        out = [int(s) for s in spec.split(",") if s.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{what} must be a comma list of ints, got {spec!r}") from e
    if not out or any(v < 1 for v in out):
        raise argparse.ArgumentTypeError(f"{what} must list ints >= 1, got {spec!r}")
    return out


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse the flags (a leading "e2e" is accepted and dropped). Smoke mode (``--smoke``,
    ``MIXQ_SMOKE=1`` or no CUDA) changes the defaults to the tiny model and a few tokens."""
    from mixq.data import smoke_mode

    argv = list(argv)
    if argv and argv[0] == "e2e":
        argv = argv[1:]
    p = argparse.ArgumentParser(prog="python -m mixq bench e2e",
                                description="end-to-end HF bf16 vs mixq tokens/s and memory")
    p.add_argument("--models", default=None, help=f"comma list of {MODELS}")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of {MODES}")
    p.add_argument("--layers", type=int, default=None, help="keep only N decoder layers")
    p.add_argument("--prompt-len", type=int, default=None, help="prefill tokens (default 2048)")
    p.add_argument("--decode-prompt-len", type=int, default=None, help="decode prompt (128)")
    p.add_argument("--new-tokens", type=int, default=None, help="decode steps (64)")
    p.add_argument("--batches", default=None, help="decode batch sizes (default 1,16)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs, best kept (3)")
    p.add_argument("--static-cache", action="store_true", help="HF static KV cache")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the prefill and let generate compile decode steps "
                        "(implies --static-cache)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default=None, help="default cuda if available, else cpu")
    p.add_argument("--json", default=None,
                   help="rows JSON (default results/e2e_<device>.json; smoke runs: none)")
    p.add_argument("--smoke", action="store_true", help="tiny model, few tokens (CPU)")
    args = p.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.smoke = args.smoke or smoke_mode() or torch.device(device).type != "cuda"
    small = args.smoke
    args.model_list = [s.strip() for s in (args.models or ("tiny" if small else "llama3-8b,smollm2"))
                       .split(",") if s.strip()]
    args.mode_list = [s.strip() for s in args.modes.split(",") if s.strip()]
    bad = [m for m in args.model_list if m not in MODELS] + \
          [m for m in args.mode_list if m not in MODES]
    if bad:
        p.error(f"unknown models/modes {bad}; models {MODELS}, modes {MODES}")
    args.prompt_len = args.prompt_len or (32 if small else 2048)
    args.decode_prompt_len = args.decode_prompt_len or (8 if small else 128)
    args.new_tokens = args.new_tokens or (4 if small else 64)
    args.repeats = args.repeats or (1 if small else 3)
    try:
        args.batch_list = _int_list(args.batches or ("1,2" if small else "1,16"), "--batches")
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    args.static_cache = args.static_cache or args.compile
    args.device = device
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: ``main(["e2e", "--layers", "4", ...])``; returns the exit code (1 when every
    row failed)."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = torch.device(args.device)
    json_path = args.json
    if json_path is None and not args.smoke:
        from mixq.data import project_dir
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        json_path = project_dir("results") / f"e2e_{device_slug(name)}.json"
    rows, meta = run_e2e(args.model_list, args.mode_list, layers=args.layers,
                         prompt_len=args.prompt_len, decode_prompt_len=args.decode_prompt_len,
                         new_tokens=args.new_tokens, batches=args.batch_list,
                         repeats=args.repeats, static_cache=args.static_cache,
                         compile=args.compile, device=device,
                         dtype=getattr(torch, args.dtype), json_path=json_path)
    print(_format(rows))
    for note in meta["skipped_modes"]:
        print(f"skipped: {note}")
    if json_path:
        print(f"\nrows written to {json_path} (meta beside it)")
    return 0 if any(r.get("tokens_per_s") is not None for r in rows) else 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
