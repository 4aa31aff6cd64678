"""GEMM benchmark (``python -m mixq bench gemm``): mixq kernels vs the GPU peers, on Llama
linear-layer shapes.

``python -m mixq bench gemm [--json PATH] [--md PATH] [--shapes 1b,8b] [--m 1,16,128,512,2048]
[--modes ...] [--quick]``

For every shape (N, K) and token count M it times, in one process on one GPU:

==================  =========================================================================
mode                what is timed
==================  =========================================================================
bf16                ``x @ w.T`` (cuBLAS), the baseline every speedup is relative to
fp8_scaled_mm       ``torch._scaled_mm`` e4m3 x e4m3, per-token x per-channel fp32 scales, bf16 out
int8_int_mm         ``torch._int_mm`` int8 x int8 -> int32 (no rescale: int32 output)
tinygemm_w4a16      ``torch._weight_int4pack_mm`` int4 g128 weights x bf16 activations
mixq_w4a16          `mixq.kernels.w4a16.w4a16_matmul` (g128, bf16 activations)
mixq_w4a4           `mixq.kernels.w4a4.w4a4_gemm`, int4 x int4 per-channel, pre-quantized x
mixq_w4a4_outliers  the same with k = 1% of K FP16 outlier channels fused (k a multiple of 16)
mixq_w4a4+quant     act-quant kernel (bf16 x -> int8 codes + scales + fp16 outliers) + the above
mixq_quant          the act-quant kernel alone (also reported as a fraction of copy bandwidth)
mixq_w4a4_decode    `mixq.kernels.w4a4_decode.w4a4_decode_gemm`: act-quant fused into the
                    GEMM (one launch; what W4A4Linear runs for M <= 16), 1% outliers gathered
bf16_module         ``nn.Linear`` (bf16, no bias): what a user's float model runs
mixq_w4a16_module   `mixq.nn.W4A16Linear` g128 forward: checks, reshapes and the kernel
mixq_w4a4_module    `mixq.nn.W4A4Linear` per-row, 1% FP16 outliers (the last 1% of channels,
                    gathered by the act-quant kernel), forward: checks, act-quant + GEMM
==================  =========================================================================

``module`` (``--modes module``) selects the three module modes plus the kernels they run
(bf16, mixq_w4a16, mixq_w4a4+quant, mixq_w4a4_decode): the module's cost over its kernels
alone (the decode kernel for M <= 16, act-quant + GEMM above) is what the
Python layer adds. Those six modes also get ``eager_ms``: the median per call of a plain eager
loop (`mixq.experiments.common.eager_time_ms`: no graph, so host-side costs -- Python, checks,
launches -- show where the host is slower than the GPU, as at M=1), and
``eager_overhead_us``: a module's eager_ms minus its kernels' eager_ms, in microseconds.

Method: real random data (x ~ N(0, 1) with the last 1% of channels scaled x30, like LLM
activation outliers; w ~ N(0, 0.02)), never zeros. Each timed call runs inside a CUDA graph of
`R` calls on `R` different input sets (weights included), replayed under
``triton.testing.do_bench`` (`mixq.experiments.common.cuda_time_ms`; median; do_bench flushes
L2 before every replay), so launch overhead is amortized and no call finds its operands in L2.
``rel_err_vs_bf16`` is ``||y - y_bf16||_F / ||y_bf16||_F`` against the bf16 output on the same
data, i.e. the quantization error of the mode. The device's copy bandwidth (a 1 GiB
device-to-device copy, bytes read + written) is measured in the same run; the quantize kernel's
achieved bandwidth is reported as a fraction of it.

Output: a printed table per shape; with ``--json`` the rows (one per shape, M and mode, each
with the environment of `mixq.experiments.common.environment`) and ``<stem>.meta.json``; with
``--md`` a Markdown table of all rows.
"""
from __future__ import annotations

import argparse
import functools
import platform
from collections.abc import Callable, Sequence
from copy import deepcopy

import torch

from mixq.experiments.common import (ENV_KEYS, Timing, add_common_flags, comma_list, command_parser,
                                     cuda_time_ms, eager_time_ms, environment, environment_note,
                                     input_sets, int_list, markdown_table, write_outputs)

__all__ = ["SHAPES", "DEFAULT_M", "QUICK_M", "GEMM_KERNELS", "MODULE_MODES", "MODES",
           "EAGER_MODES", "eager_time_ms", "build_parser", "parse_args", "main",
           "select_shapes", "outlier_count", "add_speedups", "format_table", "format_markdown",
           "make_row", "copy_bandwidth", "tinygemm_weight", "run_gemm"]

SHAPES: dict[str, list[tuple[str, int, int]]] = {
    "1b": [("qkv", 3072, 2048), ("o", 2048, 2048), ("gate_up", 16384, 2048),
           ("down", 2048, 8192), ("lm_head", 128256, 2048)],
    "8b": [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096),
           ("down", 4096, 14336)],
}
"""Linear layers (name, N, K) of Llama-3.2-1B and Llama-3-8B; gate+up fused, qkv fused."""

DEFAULT_M = (1, 16, 128, 512, 2048)
QUICK_M = (16, 2048)
#: The GEMMs timed (bench rows' "mode"): the peers, then mixq's kernels.
GEMM_KERNELS = ("bf16", "fp8_scaled_mm", "int8_int_mm", "tinygemm_w4a16", "mixq_w4a16",
                "mixq_w4a4", "mixq_w4a4_outliers", "mixq_w4a4+quant", "mixq_w4a4_g128+quant",
                "mixq_quant", "mixq_w4a4_decode")
#: nn modules timed beside the kernels they launch (module -> kernels-alone mode).
MODULE_MODES = {"bf16_module": "bf16", "mixq_w4a16_module": "mixq_w4a16",
                "mixq_w4a4_module": "mixq_w4a4+quant"}
#: Every mode, and the modes that also get an eager-loop time.
MODES = GEMM_KERNELS + tuple(MODULE_MODES)
EAGER_MODES = frozenset(MODULE_MODES) | frozenset(MODULE_MODES.values()) | {"mixq_w4a4_decode"}


def module_kernels(mode: str, m: int) -> str | None:
    """The kernels-alone mode a module mode runs at M tokens (None: not a module mode)."""
    from mixq.nn.linear import W4A4_DECODE_MAX_M     # W4A4Linear's dispatch (0: off)

    if mode == "mixq_w4a4_module" and m <= W4A4_DECODE_MAX_M:
        return "mixq_w4a4_decode"
    return MODULE_MODES.get(mode)
OUTLIER_FRACTION = 0.01
OUTLIER_GAIN = 30.0
COLUMNS = ("M", "mode", "NxK", "time_ms", "speedup_vs_bf16", "rel_err_vs_bf16")


# ------------------------------------------------------------------------------------------
# Pure helpers (tested without a GPU)
# ------------------------------------------------------------------------------------------

def outlier_count(k: int, fraction: float = OUTLIER_FRACTION, multiple: int = 16) -> int:
    """Number of FP16 outlier channels: `fraction` of K rounded to a multiple (at least one)."""
    return max(multiple, int(round(k * fraction / multiple)) * multiple)


def select_shapes(spec: str) -> list[tuple[str, int, int]]:
    """Parse ``--shapes``: comma list of model names ("1b", "8b") or "model.layer" names.

    Returns ``[(name, N, K), ...]`` with names like ``"8b.gate_up"``.
    """
    out: list[tuple[str, int, int]] = []
    for item in (s.lower() for s in comma_list(spec)):
        model, _, layer = item.partition(".")
        if model not in SHAPES:
            raise ValueError(f"--shapes: unknown model {model!r} in {item!r}; "
                             f"choose from {sorted(SHAPES)}")
        layers = [t for t in SHAPES[model] if not layer or t[0] == layer]
        if not layers:
            raise ValueError(f"--shapes: {model} has no layer {layer!r}; "
                             f"choose from {[t[0] for t in SHAPES[model]]}")
        out += [(f"{model}.{name}", n, k) for name, n, k in layers]
    if not out:
        raise ValueError("--shapes selects no shape")
    return out


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``python -m mixq bench gemm``."""
    p = command_parser("bench gemm", "GEMM benchmark of mixq kernels vs peers (CUDA)")
    add_common_flags(p, "json", "md")
    p.add_argument("--shapes", default="1b,8b",
                   help="models (1b, 8b) or layers (8b.gate_up), comma separated")
    p.add_argument("--m", default=None, help=f"token counts, default {','.join(map(str, DEFAULT_M))}")
    p.add_argument("--modes", default=",".join(GEMM_KERNELS),
                   help="subset of modes (bf16 always runs); 'module' = the nn modules and "
                        "their kernels, with eager-loop times; 'all' = every mode")
    p.add_argument("--quick", action="store_true",
                   help=f"short timing (fewer repeats) and M={','.join(map(str, QUICK_M))} "
                        "unless --m is given")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the flags; adds ``.shape_list``, ``.m_list`` and ``.mode_list`` (bf16 first).
    Raises ValueError for bad --shapes / --m; unknown --modes exit through argparse."""
    p = build_parser()
    args = p.parse_args(None if argv is None else list(argv))
    args.shape_list = select_shapes(args.shapes)
    args.m_list = int_list(args.m, "--m") if args.m else list(QUICK_M if args.quick else DEFAULT_M)
    modes: list[str] = []
    for m in comma_list(args.modes):
        group = {"module": [*MODULE_MODES.values(), "mixq_w4a4_decode", *MODULE_MODES],
                 "all": list(MODES)}.get(m, [m])
        modes += [g for g in group if g not in modes]
    bad = [m for m in modes if m not in MODES]
    if bad:
        p.error(f"unknown modes {bad}; choose from {list(MODES)}, module or all")
    args.mode_list = ["bf16"] + [m for m in modes if m != "bf16"]
    return args


def make_row(meta: dict, shape: str, n: int, k: int, m: int, mode: str, time_ms: float | None,
             rel_err: float | None, **extra) -> dict:
    """One result row (with the environment keys of `meta`); `time_ms` None means the mode is
    unavailable (reason in extra['note'])."""
    row = {**{k_: meta.get(k_) for k_ in ENV_KEYS}, "shape": shape, "N": n, "K": k, "M": m,
           "mode": mode, "time_ms": time_ms, "speedup_vs_bf16": None, "rel_err_vs_bf16": rel_err}
    row.update(extra)
    return row


def add_speedups(rows: list[dict]) -> list[dict]:
    """Fill ``speedup_vs_bf16 = t(bf16) / t(mode)`` from the bf16 row of the same shape and M;
    rows with ``eager_ms`` also get ``eager_speedup_vs_bf16`` (against bf16_module's eager
    time: what the user's float model costs in the same loop) and, for module modes,
    ``eager_overhead_us`` (module eager_ms minus its kernels' eager_ms)."""
    def by_mode(mode, key):
        return {(r["shape"], r["M"]): r.get(key) for r in rows if r["mode"] == mode}

    base = by_mode("bf16", "time_ms")
    eager_base = by_mode("bf16_module", "eager_ms")
    for r in rows:
        t0 = base.get((r["shape"], r["M"]))
        ok = t0 is not None and r["time_ms"] is not None and r["time_ms"] > 0
        r["speedup_vs_bf16"] = (t0 / r["time_ms"]) if ok else None
        if r.get("eager_ms"):
            e0 = eager_base.get((r["shape"], r["M"]))
            r["eager_speedup_vs_bf16"] = e0 / r["eager_ms"] if e0 else None
        kernels = module_kernels(r["mode"], r["M"])
        if kernels and r.get("eager_ms"):
            k_ms = by_mode(kernels, "eager_ms").get((r["shape"], r["M"]))
            r["eager_overhead_us"] = 1e3 * (r["eager_ms"] - k_ms) if k_ms else None
    return rows


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _cells(r: dict) -> list[str]:
    time_cell = _fmt(r["time_ms"], ".4f") if r["time_ms"] is not None else "n/a"
    return [str(r["M"]), r["mode"], f"{r['N']}x{r['K']}", time_cell,
            _fmt(r["speedup_vs_bf16"], ".2f"), _fmt(r["rel_err_vs_bf16"], ".2e")]


def format_table(rows: list[dict]) -> str:
    """Plain-text table (M, mode, NxK, time_ms, speedup_vs_bf16, rel_err_vs_bf16), grouped by
    shape, rows in the given order."""
    lines: list[str] = []
    header = ["shape", *COLUMNS]
    body = [[r["shape"], *_cells(r)] for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body)]
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    lines.append("  ".join("-" * w for w in widths))
    last = None
    for r, cells in zip(rows, body):
        if last is not None and (r["shape"], r["M"]) != last:
            lines.append("")
        last = (r["shape"], r["M"])
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths)))
    return "\n".join(lines)


def _note(r: dict) -> str:
    note = r.get("note", "") or ""
    if r.get("eager_ms") is not None:
        note = (note + "; " if note else "") + f"eager {r['eager_ms'] * 1e3:.1f} us"
        if r.get("eager_overhead_us") is not None:
            note += f" (+{r['eager_overhead_us']:.1f} us over its kernels)"
    if r.get("frac_of_copy_bw") is not None:
        note = (note + "; " if note else "") + f"{100 * r['frac_of_copy_bw']:.0f}% of copy BW"
    return note


def format_markdown(rows: list[dict], meta: dict) -> str:
    """Markdown: a header with the device/versions/method, then one table of all rows."""
    out = [f"# GEMM benchmark: {meta.get('device_name')}", "",
           environment_note(meta) + " Median of `triton.testing.do_bench` over CUDA-graph "
           f"replays (L2 flushed before each), {meta.get('rotation', 'rotated inputs')}.", ""]
    if meta.get("copy_bandwidth_gbs"):
        out += [f"Device copy bandwidth (1 GiB D2D copy, read + write): "
                f"{meta['copy_bandwidth_gbs']:.0f} GB/s.", ""]
    if meta.get("note"):
        out += [meta["note"], ""]
    columns = [("shape", "shape")] + [(c, lambda r, i=i: _cells(r)[i])
                                      for i, c in enumerate(COLUMNS)] + [("note", _note)]
    out.append(markdown_table(rows, columns))
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------
# GPU side
# ------------------------------------------------------------------------------------------

def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    d = (y.float() - ref.float()).norm()
    return float(d / ref.float().norm().clamp_min(1e-30))


def copy_bandwidth(timing: Timing) -> float:
    """GB/s of a 1 GiB device-to-device copy, counting bytes read + written."""
    from triton.testing import do_bench

    n = 1 << 30
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
    copy = functools.partial(torch.empty_like(src).copy_, src)
    t = do_bench(copy, warmup=timing.warmup_ms, rep=timing.rep_ms, return_mode="median")
    del src, copy                        # free the 2 GiB before the GEMM shapes
    return 2 * n / (t * 1e-3) / 1e9


def _quant_weight_rows(w: torch.Tensor, group: int | None):
    """Symmetric int4 RTN of w (N, K): (q int8 (N, K), scale fp16 (N, K//g or 1))."""
    from mixq.config import QuantSpec
    from mixq.quant import quantize

    spec = QuantSpec(4, True, "row") if group is None else QuantSpec(4, True, "group", group)
    qt = quantize(w, spec)
    return qt.q, qt.scale


def tinygemm_weight(w: torch.Tensor, group: int = 128):
    """int4 g128 weights in tinygemm's format: packed tensor and (K/g, N, 2) bf16 scales/zeros."""
    q, s = _quant_weight_rows(w, group)                     # q in [-8, 7], w ~ q * s
    u = (q.to(torch.int32) + 8)                              # tinygemm: w = (u - 8) * s + z
    packed_u8 = (u[:, ::2] << 4 | u[:, 1::2]).to(torch.uint8)
    wp = torch._convert_weight_to_int4pack(packed_u8.contiguous(), 8)
    sz = torch.stack([s.to(torch.bfloat16), torch.zeros_like(s, dtype=torch.bfloat16)], dim=-1)
    return wp, sz.transpose(0, 1).contiguous()


class _ShapeBench:
    """All operands of one (N, K) shape for the largest M; modes slice x[:M]."""

    def __init__(self, n: int, k: int, m_max: int, timing: Timing):
        self.n, self.k, self.timing = n, k, timing
        self.k_out = outlier_count(k)
        self.kq = k - self.k_out
        x = torch.randn(m_max, k, device="cuda")
        x[:, self.kq:] *= OUTLIER_GAIN                       # the outlier channels (last 1%)
        self.x = x.to(torch.bfloat16)
        self.w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        self._cache: dict = {}

    # -- operand preparation, once per shape and mode (weights are M-independent) ----------
    def weights(self, mode: str):
        if mode not in self._cache:
            self._cache[mode] = self._prepare(mode)
        return self._cache[mode]

    def _prepare(self, mode: str):
        from mixq.kernels import w4a4

        w = self.w
        if mode == "fp8_scaled_mm":
            s = (w.float().abs().amax(dim=1, keepdim=True) / 448.0).clamp_min(1e-12)
            wf8 = (w.float() / s).to(torch.float8_e4m3fn)
            return dict(w=wf8, s=s.T.contiguous())
        if mode == "int8_int_mm":
            s = (w.float().abs().amax(dim=1, keepdim=True) / 127.0).clamp_min(1e-12)
            return dict(w=torch.round(w.float() / s).clamp(-127, 127).to(torch.int8), s=s)
        if mode == "tinygemm_w4a16":
            wp, sz = tinygemm_weight(w)
            return dict(w=wp, sz=sz)
        if mode == "mixq_w4a16":
            from mixq.quant import pack_int4
            q, s = _quant_weight_rows(w, 128)
            return dict(w=pack_int4(q), s=s)
        if mode == "mixq_w4a4":
            q, s = _quant_weight_rows(w, None)
            return dict(w=w4a4.prepare_w4a4_weight(q), s=s)
        if mode in ("mixq_w4a4_outliers", "mixq_w4a4+quant", "mixq_w4a4_decode",
                    "mixq_w4a4_g128+quant"):
            group, wq = None, w[:, :self.kq].contiguous()
            if mode == "mixq_w4a4_g128+quant":          # zero columns up to Kpad: g | Kpad
                group = 128
                wq = torch.nn.functional.pad(wq, (0, w4a4.padded_in_features(self.kq) - self.kq))
            q, s = _quant_weight_rows(wq, group)
            return dict(w=w4a4.prepare_w4a4_weight(q), s=s,
                        w_out=w[:, self.kq:].to(torch.float16).contiguous())
        if mode in MODULE_MODES:
            return dict(mod=self.module(mode))
        return {}

    def module(self, mode: str) -> torch.nn.Module:
        """The nn module a user runs for `mode`, built from an nn.Linear holding ``self.w``."""
        from mixq import nn as qnn
        from mixq.config import QuantSpec

        lin = torch.nn.Linear(self.k, self.n, bias=False, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            lin.weight.copy_(self.w)
        if mode == "bf16_module":
            return lin.requires_grad_(False)
        if mode == "mixq_w4a16_module":
            return qnn.W4A16Linear.from_linear(lin, weight_spec=QuantSpec(4, True, "group", 128))
        outliers = torch.arange(self.kq, self.k, device="cuda")
        return qnn.W4A4Linear.from_linear(lin, weight_spec=QuantSpec(4, True, "row"),
                                          outlier_idx=outliers)

    # -- one call per mode ------------------------------------------------------------------
    def call_factory(self, mode: str, m: int) -> tuple[Callable[[dict], Callable], int]:
        """(make_call(operand_set) -> zero-arg call returning the output, bytes per call)."""
        from mixq.kernels import act_quant as aq
        from mixq.kernels import w4a4, w4a16

        n, k, kq, ko = self.n, self.k, self.kq, self.k_out
        kqp = w4a4.padded_in_features(kq)            # x_q's stored columns (pad_to=block_k)
        wb = self.weights(mode)
        out_b = 2 * m * n
        if mode == "bf16":
            def make(o):
                return lambda: o["x"] @ o["w"].T
            return make, 2 * m * k + 2 * n * k + out_b
        if mode == "fp8_scaled_mm":
            def make(o):
                return lambda: torch._scaled_mm(o["xq"], o["w"].T, scale_a=o["xs"],
                                                scale_b=o["s"], out_dtype=torch.bfloat16)
            return make, m * k + n * k + out_b
        if mode == "int8_int_mm":
            def make(o):
                return lambda: torch._int_mm(o["xq"], o["w"].T)
            return make, m * k + n * k + 4 * m * n
        if mode == "tinygemm_w4a16":
            def make(o):
                return lambda: torch._weight_int4pack_mm(o["x"], o["w"], 128, o["sz"])
            return make, 2 * m * k + n * k // 2 + 4 * n * (k // 128) + out_b
        if mode == "mixq_w4a16":
            def make(o):
                return lambda: w4a16.w4a16_matmul(o["x"], o["w"], o["s"], 128)
            return make, 2 * m * k + n * k // 2 + 2 * n * (k // 128) + out_b
        if mode == "mixq_w4a4":
            def make(o):
                return lambda: w4a4.w4a4_gemm(o["xq"], o["xs"], o["w"], o["s"])
            return make, m * k + 2 * m + wb["w"].numel() + 2 * n + out_b
        if mode == "mixq_w4a4_outliers":
            def make(o):
                return lambda: w4a4.w4a4_gemm(o["xq"], o["xs"], o["w"], o["s"],
                                              x_out=o["xo"], w_out=o["w_out"])
            return make, m * kqp + 2 * m + wb["w"].numel() + 2 * n + 2 * (m + n) * ko + out_b
        if mode in ("mixq_w4a4+quant", "mixq_w4a4_g128+quant"):
            group = 128 if mode == "mixq_w4a4_g128+quant" else None

            def make(o):
                def run():
                    xq, xs, xo = aq.act_quant(o["x"], n_outliers=ko, out_format="int8",
                                              pad_to=w4a4.W4A4_BLOCK_K)
                    return w4a4.w4a4_gemm(xq, xs, o["w"], o["s"], group_size=group, x_out=xo,
                                          w_out=o["w_out"])
                return run
            return make, (2 * m * k) + 2 * (m * kqp + 2 * m + 2 * m * ko) \
                + wb["w"].numel() + 2 * wb["s"].numel() + 2 * n * ko + out_b
        if mode == "mixq_quant":
            def make(o):
                return lambda: aq.act_quant(o["x"], n_outliers=ko, out_format="int8",
                                            pad_to=w4a4.W4A4_BLOCK_K)
            return make, 2 * m * k + m * kqp + 2 * m + 2 * m * ko
        if mode == "mixq_w4a4_decode":
            from mixq.kernels.w4a4_decode import w4a4_decode_gemm

            def make(o):
                return lambda: w4a4_decode_gemm(o["x"], o["w"], o["s"], n_outliers=ko,
                                                w_out=o["w_out"])
            return make, 2 * m * k + wb["w"].numel() + 2 * n + 2 * n * ko + out_b
        if mode in MODULE_MODES:
            _, kernel_bytes = self.call_factory(MODULE_MODES[mode], m)

            def make(o):
                return functools.partial(o["mod"], o["x"])
            return make, kernel_bytes
        raise ValueError(f"unknown mode {mode!r}")

    def operand_set(self, mode: str, m: int, copy: bool) -> dict:
        """Activations (quantized as the mode needs) for M tokens + the mode's weights."""
        from mixq.kernels import act_quant as aq
        from mixq.kernels import w4a4

        x = self.x[:m].contiguous()
        o = {kk: (deepcopy(v) if isinstance(v, torch.nn.Module) else v.clone()) if copy else v
             for kk, v in self.weights(mode).items()}
        if mode == "bf16":
            o["w"] = self.w.clone() if copy else self.w
        if mode == "fp8_scaled_mm":
            xs = (x.float().abs().amax(dim=1, keepdim=True) / 448.0).clamp_min(1e-12)
            o.update(xq=(x.float() / xs).to(torch.float8_e4m3fn), xs=xs)
        elif mode == "int8_int_mm":
            xs = (x.float().abs().amax(dim=1, keepdim=True) / 127.0).clamp_min(1e-12)
            o.update(xq=torch.round(x.float() / xs).clamp(-127, 127).to(torch.int8), xs=xs)
        elif mode == "mixq_w4a4":
            xq, xs, _ = aq.act_quant(x, out_format="int8")
            o.update(xq=xq, xs=xs)
        elif mode == "mixq_w4a4_outliers":
            xq, xs, xo = aq.act_quant(x, n_outliers=self.k_out, out_format="int8",
                                      pad_to=w4a4.W4A4_BLOCK_K)   # the weight's Kpad columns
            o.update(xq=xq, xs=xs, xo=xo)
        o["x"] = x.clone() if copy else x
        return o

    def finish(self, mode: str, y, o: dict) -> torch.Tensor | None:
        """Float output comparable with bf16's (rescales int8's int32 output)."""
        if mode == "mixq_quant":
            return None
        if mode == "int8_int_mm":
            return y.float() * o["xs"] * o["s"].T
        return y

    def run(self, mode: str, m: int) -> tuple[float, torch.Tensor | None, dict]:
        make, call_bytes = self.call_factory(mode, m)
        n_sets = input_sets(call_bytes)
        sets = [self.operand_set(mode, m, copy=i > 0) for i in range(n_sets)]
        y = self.finish(mode, make(sets[0])(), sets[0])
        calls = [make(o) for o in sets]
        t, how = cuda_time_ms(calls, self.timing)
        extra = dict(bytes=call_bytes, n_sets=n_sets, timing=how)
        if mode in EAGER_MODES:
            with torch.no_grad():
                extra["eager_ms"] = eager_time_ms(calls, self.timing)
        del sets, calls
        return t, y, extra


def _tuned_config(mode: str, m: int) -> str | None:
    """The config the autotuner picked for the last call of a mixq mode (for the JSON rows)."""
    try:
        if mode.startswith("mixq_w4a4"):
            from mixq.kernels import w4a4
            tuner = w4a4._pick_kernel(m)
        elif mode == "mixq_w4a16":
            from mixq.kernels import w4a16
            tuner = w4a16._TUNED[w4a16.w4a16_regime(m)]
        elif mode == "mixq_quant":
            from mixq.kernels import act_quant
            tuner = act_quant._act_quant_kernel
        else:
            return None
        best = getattr(tuner, "best_config", None)
        return None if best is None else str(best)
    except Exception:  # noqa: BLE001 - informational only
        return None


def _meta(timing: Timing) -> dict:
    props = torch.cuda.get_device_properties(0)
    return {**environment("cuda"), "sm_count": props.multi_processor_count,
            "host": platform.node(), "copy_bandwidth_gbs": copy_bandwidth(timing),
            "rotation": "inputs (weights included) rotated over up to 8 copies per graph replay",
            "note": (f"x ~ N(0,1) with the last {OUTLIER_FRACTION:.0%} of channels x{OUTLIER_GAIN:g} "
                     "(outliers); w ~ N(0, 0.02). int8_int_mm returns int32 (rescale not timed). "
                     "mixq_w4a4 activations are an int8 operand (one int4 code per byte).")}


def _measure(sb: "_ShapeBench", meta: dict, name: str, m: int, mode: str, ref):
    """``(row, output)`` of one mode at one M (row with a note, output None, when it failed)."""
    n, k = sb.n, sb.k
    try:
        t, y, extra = sb.run(mode, m)
    except Exception as e:  # noqa: BLE001 - a peer missing on this build
        torch.cuda.empty_cache()
        return make_row(meta, name, n, k, m, mode, None, None,
                        note=f"unavailable: {type(e).__name__}: {str(e)[:160]}"), None
    ref = y if mode == "bf16" else ref
    err = _rel_err(y, ref) if (y is not None and ref is not None) else None
    extra["gbs"] = extra["bytes"] / (t * 1e-3) / 1e9
    extra["tops"] = 2 * m * n * k / (t * 1e-3) / 1e12 if mode != "mixq_quant" else None
    if mode in ("mixq_w4a4_outliers", "mixq_w4a4+quant", "mixq_w4a4_g128+quant", "mixq_quant",
                "mixq_w4a4_module", "mixq_w4a4_decode"):
        extra["k_out"] = sb.k_out
    if mode == "mixq_quant":
        extra["frac_of_copy_bw"] = extra["gbs"] / meta["copy_bandwidth_gbs"]
    cfg = _tuned_config(mode, m)
    if cfg:
        extra["config"] = cfg
    return make_row(meta, name, n, k, m, mode, t, err, **extra), y


def run_gemm(shapes: list[tuple[str, int, int]], ms: list[int], modes: list[str],
             timing: Timing, json_path: str | None = None, md_path: str | None = None,
             progress: bool = True) -> tuple[list[dict], dict]:
    """Benchmark every (shape, M, mode) (bf16 first in `modes`: the reference of rel_err);
    returns ``(rows, meta)``, also written after each shape."""
    from tqdm.auto import tqdm

    meta = _meta(timing)
    rows: list[dict] = []
    for name, n, k in tqdm(shapes, desc="shapes", disable=not progress):
        sb = _ShapeBench(n, k, max(ms), timing)
        for m in ms:
            ref = None
            for mode in modes:
                row, y = _measure(sb, meta, name, m, mode, ref)
                ref = y if mode == "bf16" else ref
                rows.append(row)
                del y
            del ref
        del sb
        torch.cuda.empty_cache()
        add_speedups(rows)
        tqdm.write(format_table([r for r in rows if r["shape"] == name]))
        write_outputs(json_path, md_path, rows, meta, format_markdown)
    return rows, meta


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mixq bench gemm ...``; returns the exit code (2 without a CUDA GPU)."""
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("mixq bench gemm needs a CUDA GPU (none found); nothing timed.")
        return 2
    timing = Timing(5, 25) if args.quick else Timing(10, 60)
    torch.manual_seed(0)
    rows, _ = run_gemm(args.shape_list, args.m_list, args.mode_list, timing,
                       json_path=args.json, md_path=args.md)
    print()
    print(format_table(rows))
    if args.json:
        print(f"\nrows written to {args.json} (meta beside it)")
    if args.md:
        print(f"markdown written to {args.md}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
