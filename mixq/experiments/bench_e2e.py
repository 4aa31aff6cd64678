"""End-to-end benchmark (``python -m mixq bench e2e``): a Hugging Face Llama in bf16 against the
same model quantized with mixq presets.

``python -m mixq bench e2e [--models llama3-8b,smollm2] [--modes bf16,w4a16-g128,...]
[--layers N] [--prompt-len 2048] [--decode-prompt-len 128] [--new-tokens 64] [--batches 1,16,64]
[--eager | --static-cache | --compile] [--json PATH] [--smoke]``

Models:

* ``llama3-8b``: `transformers.LlamaConfig` with the real Llama-3-8B sizes (hidden 4096, MLP
  14336, 32 query / 8 KV heads, 32 layers, vocab 128256) and random weights, built in the bench
  dtype directly on the device (no fp32 copy). ``--layers N`` keeps N decoder layers; rows then
  also carry ``tokens_per_s_full_est = tokens_per_s * N / 32``, a lower bound for the full model
  (the embedding and lm_head, whose cost does not grow with depth, are scaled too).
* ``smollm2``: SmolLM2-135M through `mixq.io.load_model` (staged GGUF).
* ``tiny``: a 2-layer, hidden-128 Llama: the CPU smoke configuration used by the tests.

Modes (each on a fresh copy of the model; weights from the same seed): ``bf16``, the Hugging
Face model as built (``--dtype``, bf16 by default), or a preset name of `mixq.presets`
(``mixq.quantize(model, mixq.preset(mode))``, which also switches on the preset's quantized
attention; decoding then uses the preset's KV cache, ``mixq.make_cache``). The defaults,
`DEFAULT_MODES`:

==========================  ============================================================
w4a16-g128                  int4 g128 weights, bf16 activations
w4a4-rtn                    int4 g128 weights x int4 per-token activations
w4a4-o1-salient             the same with 1% FP16 outlier channels, ranked by weight
                            magnitude (no calibration data needed)
w4a4-o1-salient+kv4+attn    + the 4-bit KV cache and mixq's int8 attention reading it
==========================  ============================================================

Quantization runs without calibration data (so a preset that needs it, e.g. ``w4a4-o1``, gives
rows with an ``error``): the numbers are about speed and memory, not accuracy. Phases (random
token ids, greedy):

* ``prefill``: one forward over (1, prompt_len) tokens with ``logits_to_keep=1``; tokens/s =
  prompt_len / seconds.
* ``decode``: ``model.generate`` of n + 1 tokens minus the same with 1 token, after a prompt of
  ``decode_prompt_len`` tokens, at each batch size: tokens/s = batch * n / seconds, i.e. the
  decode steps only.

Same setup on both sides. On a GPU the default is ``--compile``: HF's static KV cache
(``cache_implementation="static"``; a preset's own KV cache takes precedence) and HF's generate
compiling the decode step (``disable_compile=False``: torch.compile "reduce-overhead", i.e. CUDA
graphs), the prefill forward wrapped in ``torch.compile`` -- what a serving user runs. Each
mode starts with empty compile caches (``torch._dynamo.reset()``, as a fresh process would) and
its rows record ``compiled_graphs``, the graphs dynamo built for it so far.
``--static-cache`` keeps the static cache without compiling; ``--eager`` turns both off (the
dynamic cache, compilation disabled everywhere). Smoke / CPU runs default to eager. Times are the best of ``--repeats`` runs after one warm-up; ``peak_mem_bytes`` is
``torch.cuda.max_memory_allocated`` over the phase (reset before it; None on a CPU);
``weight_bytes`` is `mixq.eval.weight_bytes`, split into ``decoder_weight_bytes`` (the decoder
layers: what quantization shrinks) and ``embed_head_bytes`` (embedding, lm_head, final norm).

Output: rows to ``results/e2e_<device>.json`` (e.g. ``e2e_h100.json``; smoke runs write only
with ``--json``) and the meta (environment, the setup) to ``<stem>.meta.json`` beside it; each
row has ``model``, ``mode``, ``phase``, ``batch``, ``tokens_per_s``, ``peak_mem_bytes`` (and
``error`` when it could not run).
"""
from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from mixq.experiments.common import (add_common_flags, check_counts, comma_list, command_parser,
                                     default_device, device_slug, environment, int_list, now,
                                     sync, torch_dtype, write_results)

__all__ = ["MODELS", "DEFAULT_MODES", "LLAMA3_8B", "TINY_LLAMA", "REQUIRED_ROW_KEYS",
           "build_model", "quant_config", "measure_prefill", "measure_decode", "weight_split",
           "run_e2e",
           "build_parser", "parse_args", "main"]

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
#: The float baseline mode (every other mode is a preset name).
BASELINE = "bf16"
DEFAULT_MODES = (BASELINE, "w4a16-g128", "w4a4-rtn", "w4a4-o1-salient",
                 "w4a4-o1-salient+kv4+attn")
REQUIRED_ROW_KEYS = ("model", "mode", "phase", "batch", "tokens_per_s", "peak_mem_bytes")
_RANDOM_MODELS = {"llama3-8b": LLAMA3_8B, "tiny": TINY_LLAMA}


# ------------------------------------------------------------------------------------ helpers
def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


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
        from mixq.io import load_model
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
    """The `mixq.config.QuantConfig` of a mode: None for "bf16", else ``mixq.preset(mode)``.
    Raises ValueError for a mode that is neither."""
    from mixq.presets import preset

    if mode == BASELINE:
        return None
    try:
        return preset(mode)
    except ValueError as e:
        raise ValueError(f"unknown mode {mode!r}: {BASELINE!r} or a preset name ({e})") from None


def _best_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()                                                  # warm-up (compilation, autotune)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
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
    check_counts(prompt_len=prompt_len, batch=batch, repeats=repeats)
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
                   cache_factory: Callable[[], object] | None = None,
                   seed: int = 0) -> dict:
    """Decode throughput with ``model.generate`` (greedy, exactly the asked token counts).

    decode seconds = t(generate new_tokens + 1) - t(generate 1): the `new_tokens` single-token
    steps after the prefill (each time the best of `repeats`).

    Args:
        prompt_len, new_tokens, batch, repeats: ints >= 1.
        static_cache: HF static KV cache. compile: let generate compile the decode step.
        cache_factory: ``() -> Cache`` passed as ``past_key_values`` (a fresh one per
            generate call, e.g. `mixq.make_cache` of the model); overrides static_cache.
    Returns:
        dict(tokens_per_s = batch * new_tokens / seconds, seconds, peak_mem_bytes).
    """
    check_counts(prompt_len=prompt_len, new_tokens=new_tokens, batch=batch, repeats=repeats)
    device = _model_device(model)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=gen).to(device)
    mask = torch.ones_like(x)

    def generate(n: int):
        kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                  disable_compile=not compile)
        if cache_factory is not None:
            kw["past_key_values"] = cache_factory()
        elif static_cache:
            kw["cache_implementation"] = "static"
        return model.generate(x, attention_mask=mask, **kw)

    _reset_peak(device)
    t_one = _best_seconds(lambda: generate(1), device, repeats)
    t_all = _best_seconds(lambda: generate(new_tokens + 1), device, repeats)
    s = max(t_all - t_one, 1e-9)       # clamp: on a tiny CPU model the difference can be noise
    return {"tokens_per_s": batch * new_tokens / s, "seconds": s, "peak_mem_bytes": _peak(device)}


# ------------------------------------------------------------------------------------- driver
def _check_run(models: Sequence[str], modes: Sequence[str], batches: Sequence[int],
               **ints: int) -> None:
    bad = [m for m in models if m not in MODELS]
    if bad or not models or not modes:
        raise ValueError(f"models must be a non-empty subset of {MODELS} and modes a non-empty "
                         f"list of {BASELINE!r} / preset names; got models {list(models)}, "
                         f"modes {list(modes)}")
    for mode in modes:
        quant_config(mode)
    check_counts(**ints)
    if not batches:
        raise ValueError("batches must list at least one batch size")
    check_counts(**{f"batches[{i}]": b for i, b in enumerate(batches)})


def _prepare(name: str, mode: str, layers, device, dtype):
    """``(model, full layer count, cache factory or None)``: the benchmark model quantized
    with the mode's preset (RTN, no calibration data)."""
    from mixq.api import make_cache, quantize
    model, full = build_model(name, layers=layers, device=device, dtype=dtype)
    cfg = quant_config(mode)
    if cfg is None:
        return model, full, None
    quantize(model, cfg, None, progress=False)
    if cfg.kv_cache is None:
        return model, full, None
    return model, full, lambda: make_cache(model, check_finite=False)


def weight_split(model: nn.Module) -> dict:
    """``{"weight_bytes", "decoder_weight_bytes", "embed_head_bytes"}`` (`mixq.eval.weight_bytes`
    of the whole model and of its decoder layers; the rest is the embedding, head and norm)."""
    from mixq.eval import weight_bytes

    total = weight_bytes(model)
    layers = getattr(getattr(model, "model", model), "layers", None)
    decoder = sum(weight_bytes(layer) for layer in layers) if layers is not None else total
    return {"weight_bytes": total, "decoder_weight_bytes": decoder,
            "embed_head_bytes": total - decoder}


def _fresh_compile_caches() -> None:
    """Forget every compiled graph before a mode (what a fresh process serving one model has).

    Why: HF's compiled decode step and the compiled prefill share one code object (the
    ``transformers.utils.generic`` forward wrapper) across every model of the process, so the
    guards of earlier modes (other module types, batch sizes) count against dynamo's
    recompile limit (8); the mode that hits it silently runs eager. Measured on the H100
    (4 layers, bf16 -> w4a4 -> w4a16 order): the last mode decoded at 0.27x bf16 from it.
    """
    torch.compiler.reset()                  # imports torch._dynamo as well
    torch._dynamo.utils.counters.clear()


def _compiled_graphs() -> int:
    """Graphs dynamo compiled since `_fresh_compile_caches` (recompiles included)."""
    import torch._dynamo.utils
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def _phase_row(model, base: dict, phase: str, batch: int, setup: dict, factory) -> dict:
    """One timed row (``error`` instead of the timing when it raised, e.g. out of memory)."""
    row = {**base, "phase": phase, "batch": batch}
    try:
        if phase == "prefill":
            res = measure_prefill(model, prompt_len=setup["prompt_len"], batch=batch,
                                  repeats=setup["repeats"], compile=setup["compile"])
            row["prompt_len"] = setup["prompt_len"]
        else:
            res = measure_decode(model, prompt_len=setup["decode_prompt_len"],
                                 new_tokens=setup["new_tokens"], batch=batch,
                                 repeats=setup["repeats"], static_cache=setup["static_cache"],
                                 compile=setup["compile"], cache_factory=factory)
            row.update(prompt_len=setup["decode_prompt_len"], new_tokens=setup["new_tokens"])
        row.update(res)
        row["tokens_per_s_full_est"] = \
            res["tokens_per_s"] * (setup["layers"] or base["full_layers"]) / base["full_layers"]
    except Exception as e:  # noqa: BLE001 - e.g. OOM at batch 16: keep going
        row.update(tokens_per_s=None, peak_mem_bytes=None,
                   error=f"{type(e).__name__}: {str(e)[:200]}")
    return row


def run_e2e(models: Sequence[str], modes: Sequence[str], *, layers: int | None = None,
            prompt_len: int = 2048, decode_prompt_len: int = 128, new_tokens: int = 64,
            batches: Sequence[int] = (1, 16), repeats: int = 3, static_cache: bool = False,
            compile: bool = False, device: str | torch.device | None = None,
            dtype: torch.dtype | None = None, json_path=None,
            progress: bool = True) -> tuple[list[dict], dict]:
    """Benchmark every (model, mode): prefill at batch 1, decode at each batch size.

    Args:
        models: names from `MODELS`. modes: "bf16" and preset names (`DEFAULT_MODES`).
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
    Raises:
        ValueError: unknown models or modes, counts < 1, no batch size.
    """
    from tqdm.auto import tqdm

    _check_run(models, modes, batches, prompt_len=prompt_len,
               decode_prompt_len=decode_prompt_len, new_tokens=new_tokens, repeats=repeats)
    device = default_device(device)
    dtype = dtype or torch.bfloat16
    setup = {"dtype": str(dtype).replace("torch.", ""), "static_cache": static_cache,
             "compile": compile, "layers": layers, "prompt_len": prompt_len,
             "decode_prompt_len": decode_prompt_len, "new_tokens": new_tokens,
             "batches": list(batches), "repeats": repeats}
    env = environment(device)
    meta = {**env, **setup, "modes": list(modes), "started": now()}
    phases = [("prefill", 1)] + [("decode", b) for b in batches]
    rows: list[dict] = []
    t_start = time.perf_counter()
    for name, mode in tqdm([(n, m) for n in models for m in modes], desc="e2e",
                           disable=not progress):
        base = {"model": name, "mode": mode, "layers": layers, "static_cache": static_cache,
                "compile": compile, "dtype": setup["dtype"], **env}
        model = None
        if compile:
            _fresh_compile_caches()
        try:
            model, full, factory = _prepare(name, mode, layers, device, dtype)
            base.update(**weight_split(model), full_layers=full)
            for phase, batch in phases:
                rows.append(_phase_row(model, base, phase, batch, setup, factory))
                if compile:
                    rows[-1]["compiled_graphs"] = _compiled_graphs()
                _free(device)
        except Exception as e:  # noqa: BLE001 - the model or its quantization failed
            rows += [{**base, "phase": p, "batch": b, "tokens_per_s": None,
                      "peak_mem_bytes": None, "error": f"{type(e).__name__}: {str(e)[:200]}"}
                     for p, b in phases]
        del model
        _free(device)
        meta["elapsed_s"] = round(time.perf_counter() - t_start, 2)
        if json_path:
            write_results(json_path, rows, meta)
    return rows, meta


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``python -m mixq bench e2e``."""
    p = command_parser("bench e2e", "end-to-end tokens/s and memory: HF bf16 vs mixq presets")
    p.add_argument("--models", default=None, help=f"comma list of {MODELS} "
                                                  "(default llama3-8b,smollm2; smoke: tiny)")
    p.add_argument("--modes", default=",".join(DEFAULT_MODES),
                   help="comma list of bf16 and preset names (python -m mixq sweep --list; "
                        "suffixes +kv4, +attn allowed)")
    p.add_argument("--layers", type=int, default=None, help="keep only N decoder layers")
    p.add_argument("--prompt-len", type=int, default=None, help="prefill tokens (default 2048)")
    p.add_argument("--decode-prompt-len", type=int, default=None, help="decode prompt (128)")
    p.add_argument("--new-tokens", type=int, default=None, help="decode steps (64)")
    p.add_argument("--batches", default=None, help="decode batch sizes (default 1,16,64)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs, best kept (3)")
    setup = p.add_mutually_exclusive_group()
    setup.add_argument("--eager", action="store_true",
                       help="dynamic cache, no compilation (the CPU / smoke default)")
    setup.add_argument("--static-cache", action="store_true",
                       help="HF static KV cache, no compilation")
    setup.add_argument("--compile", action="store_true",
                       help="static cache + torch.compile of prefill and decode steps "
                            "(CUDA graphs; the GPU default)")
    add_common_flags(p, "device", "dtype", "json", "smoke", "quiet", dtype={"default": "bf16"},
                     json={"help": "rows JSON (default results/e2e_<device>.json; smoke runs: "
                                   "none)"})
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the flags; adds ``.model_list``, ``.mode_list``, ``.batch_list``. Smoke mode
    (``--smoke``, ``MIXQ_SMOKE=1`` or no CUDA) changes the defaults to the tiny model and a few
    tokens."""
    from mixq.data import smoke_mode

    p = build_parser()
    args = p.parse_args(None if argv is None else list(argv))
    args.device = str(default_device(args.device))
    small = args.smoke = args.smoke or smoke_mode() or not args.device.startswith("cuda")
    args.model_list = comma_list(args.models or ("tiny" if small else "llama3-8b,smollm2"))
    args.mode_list = comma_list(args.modes)
    args.prompt_len = args.prompt_len or (32 if small else 2048)
    args.decode_prompt_len = args.decode_prompt_len or (8 if small else 128)
    args.new_tokens = args.new_tokens or (4 if small else 64)
    args.repeats = args.repeats or (1 if small else 3)
    if not (args.eager or args.static_cache or args.compile):
        args.compile = not small                   # the GPU default: what serving runs
    args.static_cache = args.static_cache or args.compile
    try:
        args.batch_list = int_list(args.batches or ("1,2" if small else "1,16,64"), "--batches")
        _check_run(args.model_list, args.mode_list, args.batch_list, prompt_len=args.prompt_len,
                   decode_prompt_len=args.decode_prompt_len, new_tokens=args.new_tokens,
                   repeats=args.repeats)
    except ValueError as e:
        p.error(str(e))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mixq bench e2e ...``; returns the exit code (1 when every row failed)."""
    from mixq.experiments.report import e2e_table

    args = parse_args(argv)
    device = torch.device(args.device)
    json_path = args.json
    if json_path is None and not args.smoke:
        from mixq.data import project_dir
        json_path = project_dir("results") / \
            f"e2e_{device_slug(environment(device)['device_name'])}.json"
    rows, meta = run_e2e(args.model_list, args.mode_list, layers=args.layers,
                         prompt_len=args.prompt_len, decode_prompt_len=args.decode_prompt_len,
                         new_tokens=args.new_tokens, batches=args.batch_list,
                         repeats=args.repeats, static_cache=args.static_cache,
                         compile=args.compile, device=device, dtype=torch_dtype(args.dtype),
                         json_path=json_path, progress=not args.quiet)
    print(e2e_table(rows, meta))
    if json_path:
        print(f"\nrows written to {json_path} (meta beside it)")
    return 0 if any(r.get("tokens_per_s") is not None for r in rows) else 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
