"""Attention benchmark (``python -m mixq bench attention``): PyTorch SDPA against mixq's
quantized attention kernels, one layer.

``python -m mixq bench attention [--contexts 512,1024,2048,4096,8192] [--heads 32]
[--kv-heads 8] [--head-dim 128] [--batch 1] [--decode-batches 1,16] [--phases prefill,decode]
[--json PATH] [--md PATH] [--quick] [--smoke]``.
The defaults are Llama-3-8B's attention (32 query heads, 8 KV heads, head dim 128).

For every context length L it times one attention layer:

=========  ================  ==============================================================
phase      impl              what is timed
=========  ================  ==============================================================
prefill    sdpa              ``F.scaled_dot_product_attention(q, k, v, is_causal=True,
                             enable_gqa=True)``, q (B, Hq, L, D), k/v (B, Hkv, L, D): baseline
prefill    mixq_q8k8v8p8     `mixq.kernels.attention.quantized_attention`, 8-bit Q/K/V/P,
                             including the per-token quantization of its float q/k/v
prefill    mixq_q8k4v4p8     the same with 4-bit K and V
decode     sdpa              1 new query (B, Hq, 1, D) over a float (B, Hkv, L, D) K/V cache
decode     mixq_kv4          `kv4_decode_attention` (8-bit Q, 8-bit P) reading a packed
                             `mixq.hf.kv_cache.KV4Layer` holding the same L keys/values
=========  ================  ==============================================================

Only attention is timed: appending the new token to the cache is not (it is a copy on both
sides). Inputs are N(0, 1) in the bench dtype (bf16 on a GPU). On CUDA each call runs inside a
CUDA graph of up to 8 calls on copies of the inputs, replayed under ``triton.testing.do_bench``
(median, L2 flushed before each replay): `mixq.experiments.common.cuda_time_ms`.
Without CUDA it runs the smoke configuration (4 / 2 heads, head dim 16, contexts 64,128, the
Triton interpreter) timed with ``time.perf_counter`` (median of ``--repeats``): the numbers
only show that everything runs; the rows say ``device: cpu``.

Rows (`mixq.experiments.common.write_results`, meta beside them): ``model_shape, phase,
context, batch, impl, ms, speedup_vs_sdpa`` (``t(sdpa) / t(impl)``, same phase/context/batch),
``max_abs_err`` (against the impl's own reference on the same inputs: the fp32 softmax
attention for sdpa, `mixq.reference.attention.quantized_attention_reference` with the impl's
config for
mixq: a kernel check), ``max_abs_err_vs_fp32`` (against fp32 softmax attention: the
quantization error), ``kv_cache_bytes`` (decode: bytes of this layer's cache, float vs KV4;
None for prefill) and ``error`` when an impl could not run. The errors are computed on the
last `CHECK_ROWS` queries (prefill) and the first 2 sequences (decode) to keep the reference
small. The target, noted in meta and printed: decode with KV4 >= 1.5x SDPA at context 8192.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from mixq.config import FLOAT_ATTENTION, AttentionQuantConfig
from mixq.experiments.common import (Timing, add_common_flags, check_counts, comma_list,
                                     command_parser, cuda_time_ms, default_device, device_slug,
                                     environment, input_sets, int_list, markdown_table, now,
                                     torch_dtype, write_outputs)
from mixq.reference.attention import quantized_attention_reference

__all__ = ["KNOWN_SHAPES", "PREFILL_CONFIGS", "PREFILL_IMPLS", "DECODE_IMPL",
           "REQUIRED_ROW_KEYS", "TARGET", "AttentionBenchSpec", "smoke_spec",
           "run_attention_bench", "add_speedups", "target_check", "format_markdown",
           "build_parser", "parse_args", "main"]

KNOWN_SHAPES = {"llama3-8b": (32, 8, 128), "llama3.2-1b": (32, 8, 64)}
"""(query heads, KV heads, head dim) of known models; other shapes are named hq{}_hkv{}_d{}."""

DEFAULT_CONTEXTS = (512, 1024, 2048, 4096, 8192)
SMOKE_CONTEXTS = (64, 128)
CHECK_ROWS = 32
CHECK_BATCH = 2
PHASES = ("prefill", "decode")
DECODE_IMPL = "mixq_kv4"
REQUIRED_ROW_KEYS = ("model_shape", "phase", "context", "batch", "impl", "ms",
                     "speedup_vs_sdpa", "max_abs_err", "max_abs_err_vs_fp32", "kv_cache_bytes")
TARGET = {"phase": "decode", "impl": DECODE_IMPL, "context": 8192, "min_speedup": 1.5,
          "text": "decode with KV4 >= 1.5x SDPA at context 8192"}
_FLOATS = (torch.bfloat16, torch.float16, torch.float32)

#: The mixq prefill impls and their attention configs.
PREFILL_CONFIGS = {"mixq_q8k8v8p8": AttentionQuantConfig(8, 8, 8, 8),
                   "mixq_q8k4v4p8": AttentionQuantConfig(8, 4, 4, 8)}
PREFILL_IMPLS = ("sdpa", *PREFILL_CONFIGS)


@dataclass(frozen=True)
class AttentionBenchSpec:
    """What to benchmark (validated on construction: ValueError / TypeError naming the field).

    Args:
        contexts: context lengths L (ints >= 1).
        heads, kv_heads, head_dim: Hq, Hkv (dividing Hq) and D (even: KV4 packs two codes per
            byte along D).
        batch: prefill batch size. decode_batches: decode batch sizes.
        phases: subset of ("prefill", "decode").
        kv_bits: bits of the decode cache (4, or 8). group_size: KV4 key-scale group G.
        dtype: float dtype of q/k/v and of the SDPA cache (bf16 on a GPU).
    """

    contexts: tuple[int, ...] = DEFAULT_CONTEXTS
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    batch: int = 1
    decode_batches: tuple[int, ...] = (1, 16)
    phases: tuple[str, ...] = PHASES
    kv_bits: int = 4
    group_size: int = 32
    dtype: torch.dtype = torch.bfloat16

    def __post_init__(self) -> None:
        for name in ("contexts", "decode_batches", "phases"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
                raise ValueError(f"{name} must be a non-empty sequence, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        check_counts(**{f"contexts[{i}]": c for i, c in enumerate(self.contexts)},
                     **{f"decode_batches[{i}]": b for i, b in enumerate(self.decode_batches)},
                     **{n: getattr(self, n) for n in ("heads", "kv_heads", "head_dim", "batch",
                                                      "group_size")})
        if self.heads % self.kv_heads:
            raise ValueError(f"kv_heads ({self.kv_heads}) must divide heads ({self.heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even (KV4 packs two channels per byte), "
                             f"got {self.head_dim}")
        bad = [p for p in self.phases if p not in PHASES]
        if bad:
            raise ValueError(f"unknown phases {bad}; choose from {PHASES}")
        if isinstance(self.kv_bits, bool) or self.kv_bits not in (4, 8):
            raise ValueError(f"kv_bits must be 4 or 8, got {self.kv_bits!r}")
        if self.dtype not in _FLOATS:
            raise TypeError(f"dtype must be one of {_FLOATS}, got {self.dtype}")

    @property
    def model_shape(self) -> str:
        """``"llama3-8b"`` for a known (Hq, Hkv, D), else ``"hq{Hq}_hkv{Hkv}_d{D}"``."""
        shape = (self.heads, self.kv_heads, self.head_dim)
        for name, known in KNOWN_SHAPES.items():
            if known == shape:
                return name
        return "hq{}_hkv{}_d{}".format(*shape)

    @property
    def decode_impl(self) -> str:
        return f"mixq_kv{self.kv_bits}"


def smoke_spec(**overrides) -> AttentionBenchSpec:
    """The CPU smoke configuration: 4 query / 2 KV heads, head dim 16, contexts 64,128, decode
    batches 1,2 (`overrides` replace fields)."""
    fields = dict(contexts=SMOKE_CONTEXTS, heads=4, kv_heads=2, head_dim=16, batch=1,
                  decode_batches=(1, 2))
    fields.update(overrides)
    return AttentionBenchSpec(**fields)


# ------------------------------------------------------------------------------- pure helpers
def add_speedups(rows: list[dict]) -> list[dict]:
    """Fill ``speedup_vs_sdpa = t(sdpa) / t(impl)`` from the sdpa row of the same
    (model_shape, phase, context, batch); None where either time is missing."""
    def key(r):
        return r["model_shape"], r["phase"], r["context"], r["batch"]

    base = {key(r): r["ms"] for r in rows if r["impl"] == "sdpa"}
    for r in rows:
        t0 = base.get(key(r))
        ok = t0 is not None and r["ms"] is not None and r["ms"] > 0
        r["speedup_vs_sdpa"] = t0 / r["ms"] if ok else None
    return rows


def target_check(rows: list[dict], impl: str = DECODE_IMPL) -> list[dict]:
    """The target rows (decode, `impl`, context `TARGET["context"]`), one per batch:
    ``{"batch", "speedup_vs_sdpa", "met"}`` (met None when not measured)."""
    out = []
    for r in rows:
        if (r["phase"], r["impl"], r["context"]) == (TARGET["phase"], impl, TARGET["context"]):
            s = r["speedup_vs_sdpa"]
            out.append({"batch": r["batch"], "speedup_vs_sdpa": s,
                        "met": None if s is None else bool(s >= TARGET["min_speedup"])})
    return out


def _target_line(meta: dict) -> str:
    checks = meta.get("target_check") or []
    if not checks:
        return f"Target ({TARGET['text']}): not measured (context {TARGET['context']} not run)."
    parts = [f"batch {c['batch']}: " + ("n/a" if c["speedup_vs_sdpa"] is None else
                                        f"{c['speedup_vs_sdpa']:.2f}x "
                                        f"({'met' if c['met'] else 'NOT met'})")
             for c in checks]
    return f"Target ({TARGET['text']}): " + "; ".join(parts) + "."


def _table(rows: list[dict]) -> str:
    return markdown_table(rows, [
        ("phase", "phase"), ("context", "context"), ("batch", "batch"), ("impl", "impl"),
        ("ms", "ms", ".4f"), ("speedup vs sdpa", "speedup_vs_sdpa", "{:.2f}x"),
        ("max abs err", "max_abs_err", ".2e"), ("err vs fp32", "max_abs_err_vs_fp32", ".2e"),
        ("KV MiB", lambda r: r["kv_cache_bytes"] and r["kv_cache_bytes"] / 2**20, ".2f"),
        ("error", lambda r: (r.get("error") or "")[:60])])


def format_markdown(rows: list[dict], meta: dict) -> str:
    """Markdown: device, versions and method, the target line, then the table of all rows."""
    head = [f"# Attention benchmark: {meta.get('device_name')} ({meta.get('model_shape')})", "",
            f"torch {meta.get('torch')}, triton {meta.get('triton')}, dtype {meta.get('dtype')}; "
            f"{meta.get('method')}.", "", _target_line(meta), ""]
    return "\n".join(head) + _table(rows) + "\n"


# ------------------------------------------------------------------------------- measurement
def _time(calls: list[Callable[[], object]], device: torch.device, timing: Timing,
          repeats: int) -> tuple[float, str, object]:
    """``(median ms per call, how, calls[0]()'s output)``: `cuda_time_ms` (CUDA graph +
    do_bench) on CUDA, else the median of `repeats` ``time.perf_counter`` timings of calls[0]
    after one warm-up (whose output is returned: interpreted kernels are slow)."""
    out = calls[0]()
    if device.type == "cuda":
        return (*cuda_time_ms(calls, timing), out)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        calls[0]()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), "perf_counter", out


def _n_sets(call_bytes: int, device: torch.device) -> int:
    return input_sets(call_bytes) if device.type == "cuda" else 1


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool) -> torch.Tensor:
    """SDPA with grouped-query K/V (enable_gqa); (B, Hq, Lq, D) out."""
    import torch.nn.functional as F

    return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal,
                                          enable_gqa=q.shape[1] != k.shape[1])


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def _fp32_reference(q, k, v) -> torch.Tensor:
    """fp32 softmax attention (B, Lq, Hq, D), causal bottom-right aligned."""
    return quantized_attention_reference(q.float(), k.float(), v.float(),
                                         scaling=q.shape[-1] ** -0.5, config=FLOAT_ATTENTION)


class _Bench:
    """Runs the phases of one spec on one device; collects rows."""

    def __init__(self, spec: AttentionBenchSpec, device: torch.device, timing: Timing,
                 repeats: int, env: dict):
        self.spec, self.device, self.timing, self.repeats = spec, device, timing, repeats
        self.scaling = spec.head_dim ** -0.5
        self.base = {"model_shape": spec.model_shape, "dtype": str(spec.dtype)[6:], **env}
        self.rows: list[dict] = []

    def _randn(self, *shape) -> torch.Tensor:
        return torch.randn(*shape, device=self.device).to(self.spec.dtype)

    def _record(self, phase: str, ctx: int, batch: int, impl: str,
                measure: Callable[[], dict]) -> None:
        row = {**self.base, "phase": phase, "context": ctx, "batch": batch, "impl": impl,
               "ms": None, "speedup_vs_sdpa": None, "max_abs_err": None,
               "max_abs_err_vs_fp32": None, "kv_cache_bytes": None}
        try:
            row.update(measure())
        except Exception as e:  # noqa: BLE001 - e.g. OOM, or kernels unavailable here
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        self.rows.append(row)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- prefill ---------------------------------------------------------------------------
    def prefill(self, ctx: int) -> None:
        from mixq.kernels.attention import quantized_attention

        s, b = self.spec, self.spec.batch
        q = self._randn(b, s.heads, ctx, s.head_dim)
        k = self._randn(b, s.kv_heads, ctx, s.head_dim)
        v = self._randn(b, s.kv_heads, ctx, s.head_dim)
        n = min(ctx, CHECK_ROWS)
        ref32 = _fp32_reference(q[:, :, -n:], k, v)         # the last n queries' rows
        sets_n = _n_sets(2 * _nbytes(q, k, v), self.device)
        sets = [(q, k, v)] + [(q.clone(), k.clone(), v.clone()) for _ in range(sets_n - 1)]

        def sdpa():
            t, how, out = _time([lambda o=o: _sdpa(*o, True) for o in sets], self.device,
                                self.timing, self.repeats)
            err = _max_abs(out.transpose(1, 2)[:, -n:], ref32)
            return dict(ms=t, timing=how, n_sets=len(sets), max_abs_err=err,
                        max_abs_err_vs_fp32=err)

        def mixq(config):
            def call(o):
                return lambda: quantized_attention(*o, scaling=self.scaling, config=config,
                                                   is_causal=True, check_finite=False)
            t, how, out = _time([call(o) for o in sets], self.device, self.timing, self.repeats)
            out = out[:, -n:]
            ref = quantized_attention_reference(q[:, :, -n:], k, v, scaling=self.scaling,
                                                config=config)
            return dict(ms=t, timing=how, n_sets=len(sets), max_abs_err=_max_abs(out, ref),
                        max_abs_err_vs_fp32=_max_abs(out, ref32))

        self._record("prefill", ctx, b, "sdpa", sdpa)
        for impl, config in PREFILL_CONFIGS.items():
            self._record("prefill", ctx, b, impl, lambda c=config: mixq(c))

    # -- decode ----------------------------------------------------------------------------
    def decode(self, ctx: int, b: int) -> None:
        from mixq.hf.kv_cache import KV4Layer
        from mixq.kernels.attention import kv4_decode_attention

        s = self.spec
        q = self._randn(b, s.heads, 1, s.head_dim)
        k = self._randn(b, s.kv_heads, ctx, s.head_dim)
        v = self._randn(b, s.kv_heads, ctx, s.head_dim)
        c = min(b, CHECK_BATCH)
        ref32 = _fp32_reference(q[:c], k[:c], v[:c])

        def sdpa():
            sets_n = _n_sets(_nbytes(q, k, v), self.device)
            sets = [(q, k, v)] + [(q.clone(), k.clone(), v.clone()) for _ in range(sets_n - 1)]
            t, how, out = _time([lambda o=o: _sdpa(*o, False) for o in sets], self.device,
                                self.timing, self.repeats)
            err = _max_abs(out[:c].transpose(1, 2), ref32)
            return dict(ms=t, timing=how, n_sets=len(sets), max_abs_err=err,
                        max_abs_err_vs_fp32=err, kv_cache_bytes=_nbytes(k, v))

        def kv4():
            def layer():
                lay = KV4Layer(bits=s.kv_bits, group_size=s.group_size, check_finite=False)
                lay.update(k, v)
                return lay

            first = layer()
            sets_n = _n_sets(first.kv_bytes(), self.device)
            sets = [(q, first)] + [(q.clone(), layer()) for _ in range(sets_n - 1)]
            config = dataclasses.replace(PREFILL_CONFIGS["mixq_q8k8v8p8"],
                                         k_bits=None, v_bits=None)

            def call(o):
                q_, lay = o
                st = lay.packed_state()
                return lambda: kv4_decode_attention(
                    q_, st["k_codes"], st["k_scale"], st["v_codes"], st["v_scale"], st["k_res"],
                    st["v_res"], bits=lay.bits, group_size=lay.group_size, scaling=self.scaling,
                    config=config, check_finite=False)
            t, how, out = _time([call(o) for o in sets], self.device, self.timing, self.repeats)
            out = out[:c]
            k_dq, v_dq = first.dequantize()
            ref = quantized_attention_reference(q[:c], k_dq[:c], v_dq[:c], scaling=self.scaling,
                                                config=config)
            return dict(ms=t, timing=how, n_sets=len(sets), max_abs_err=_max_abs(out, ref),
                        max_abs_err_vs_fp32=_max_abs(out, ref32),
                        kv_cache_bytes=first.kv_bytes(), group_size=s.group_size)

        self._record("decode", ctx, b, "sdpa", sdpa)
        self._record("decode", ctx, b, s.decode_impl, kv4)


@torch.no_grad()
def run_attention_bench(spec: AttentionBenchSpec, *, device: str | torch.device | None = None,
                        quick: bool = False, repeats: int = 3, seed: int = 0,
                        json_path: str | None = None, md_path: str | None = None,
                        progress: bool = True) -> tuple[list[dict], dict]:
    """Benchmark every (phase, context, batch) of `spec`; returns ``(rows, meta)``.

    Args:
        spec: an `AttentionBenchSpec` (`smoke_spec()` on a CPU).
        device: default CUDA when available, else CPU (mixq kernels then need
            TRITON_INTERPRET=1; without it their rows carry an ``error``).
        quick: shorter do_bench (CUDA). repeats: perf_counter timings on CPU (median).
        seed: torch seed of the random inputs.
        json_path, md_path: written after every context (rows + ``<stem>.meta.json``; the
            Markdown of `format_markdown`).
    Raises:
        TypeError: spec is not an AttentionBenchSpec. ValueError: repeats < 1.
    """
    from tqdm.auto import tqdm

    if not isinstance(spec, AttentionBenchSpec):
        raise TypeError(f"spec must be an AttentionBenchSpec, got {type(spec).__name__}")
    check_counts(repeats=repeats)
    device = default_device(device)
    env = environment(device)
    timing = Timing(5, 25) if quick else Timing(10, 60)
    method = ("median of triton.testing.do_bench over CUDA-graph replays of up to 8 input "
              "copies (L2 flushed before each)" if device.type == "cuda" else
              f"CPU smoke run: median of {repeats} time.perf_counter timings, Triton "
              "interpreter; timings are meaningless")
    meta = {**env, "model_shape": spec.model_shape, "heads": spec.heads,
            "kv_heads": spec.kv_heads, "head_dim": spec.head_dim, "dtype": str(spec.dtype)[6:],
            "contexts": list(spec.contexts), "prefill_batch": spec.batch,
            "decode_batches": list(spec.decode_batches), "kv_bits": spec.kv_bits,
            "group_size": spec.group_size, "seed": seed, "method": method,
            "target": dict(TARGET, impl=spec.decode_impl), "target_check": [],
            "note": "one attention layer; inputs N(0,1); the cache append is not timed; errors "
                    f"on the last {CHECK_ROWS} queries (prefill) / first {CHECK_BATCH} "
                    "sequences (decode); kv_cache_bytes per layer",
            "started": now()}
    torch.manual_seed(seed)
    bench = _Bench(spec, device, timing, repeats, env)
    for ctx in tqdm(spec.contexts, desc="contexts", disable=not progress):
        if "prefill" in spec.phases:
            bench.prefill(ctx)
        if "decode" in spec.phases:
            for b in spec.decode_batches:
                bench.decode(ctx, b)
        add_speedups(bench.rows)
        meta["target_check"] = target_check(bench.rows, spec.decode_impl)
        write_outputs(json_path, md_path, bench.rows, meta, format_markdown)
    return bench.rows, meta


# ------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    """The flags of ``python -m mixq bench attention``."""
    p = command_parser("bench attention", "SDPA vs mixq quantized attention (prefill, decode)")
    p.add_argument("--contexts", default=None,
                   help=f"context lengths (default {','.join(map(str, DEFAULT_CONTEXTS))})")
    p.add_argument("--heads", type=int, default=None, help="query heads (32)")
    p.add_argument("--kv-heads", type=int, default=None, help="KV heads (8)")
    p.add_argument("--head-dim", type=int, default=None, help="head dim (128)")
    p.add_argument("--batch", type=int, default=1, help="prefill batch (1)")
    p.add_argument("--decode-batches", default=None, help="decode batch sizes (1,16)")
    p.add_argument("--phases", default=",".join(PHASES), help="prefill,decode")
    p.add_argument("--kv-bits", type=int, default=4, help="decode cache bits (4 or 8)")
    p.add_argument("--group-size", type=int, default=32, help="KV4 key-scale group (32)")
    p.add_argument("--repeats", type=int, default=3, help="CPU timings, median kept (3)")
    p.add_argument("--quick", action="store_true", help="shorter do_bench (CUDA)")
    add_common_flags(p, "device", "dtype", "json", "md", "smoke", "quiet",
                     dtype={"default": "bf16"},
                     json={"help": "rows JSON (default results/attention_<device>.json; smoke "
                                   "runs: none)"})
    return p


def _spec(args: argparse.Namespace) -> AttentionBenchSpec:
    """The spec of the parsed flags over the smoke or full defaults (ValueError / TypeError)."""
    base = smoke_spec() if args.smoke else AttentionBenchSpec()
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    return AttentionBenchSpec(
        contexts=int_list(args.contexts, "--contexts") if args.contexts else base.contexts,
        heads=base.heads if args.heads is None else args.heads,
        kv_heads=base.kv_heads if args.kv_heads is None else args.kv_heads,
        head_dim=base.head_dim if args.head_dim is None else args.head_dim,
        batch=args.batch, kv_bits=args.kv_bits, group_size=args.group_size,
        decode_batches=(int_list(args.decode_batches, "--decode-batches")
                        if args.decode_batches else base.decode_batches),
        phases=tuple(comma_list(args.phases)), dtype=torch_dtype(args.dtype))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the flags; adds ``.spec`` (an `AttentionBenchSpec`; bad values exit through
    argparse with the spec's message) and ``.smoke`` (``--smoke``, ``MIXQ_SMOKE=1`` or a CPU
    device: smoke defaults)."""
    from mixq.data import smoke_mode

    p = build_parser()
    args = p.parse_args(None if argv is None else list(argv))
    args.device = str(default_device(args.device))
    args.smoke = args.smoke or smoke_mode() or not args.device.startswith("cuda")
    try:
        args.spec = _spec(args)
    except (ValueError, TypeError) as e:
        p.error(str(e))
    return args


def _ensure_interpreter(device: torch.device) -> None:
    """On a CPU, turn the Triton interpreter on if the kernels are not imported yet (it is read
    when the kernels are defined); otherwise their rows will report the error."""
    if device.type == "cpu" and "mixq.kernels.attention" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mixq bench attention ...``; returns the exit code (1 when no row could be
    timed)."""
    args = parse_args(argv)
    device = torch.device(args.device)
    _ensure_interpreter(device)
    json_path = args.json
    if json_path is None and not args.smoke:
        from mixq.data import project_dir
        json_path = project_dir("results") / \
            f"attention_{device_slug(environment(device)['device_name'])}.json"
    rows, meta = run_attention_bench(args.spec, device=device, quick=args.quick,
                                     repeats=args.repeats, json_path=json_path, md_path=args.md,
                                     progress=not args.quiet)
    print(_table(rows))
    print()
    print(_target_line(meta))
    if json_path:
        print(f"\nrows written to {json_path} (meta beside it)")
    if args.md:
        print(f"markdown written to {args.md}")
    return 0 if any(r["ms"] is not None for r in rows) else 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
