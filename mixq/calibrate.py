"""Calibration: statistics of every linear's input, gathered one decoder layer at a time.

Post-training quantization needs to know what the activations look like: which input channels
carry outliers (per-channel max |x|), their spread, a sample of real input rows (to measure a
layer's output error) and, for GPTQ, the Hessian of the layer-wise objective
``||X W^T - X W_q^T||^2``, ``H = 2/n X^T X``.

`calibrate_layerwise` runs the calibration text through the model *sequentially*: the inputs
of layer 0 are captured once (a forward pre-hook that stops the forward with an exception),
then each layer in turn is moved to the device, observed (hooks on its linears -> `LinearStats`),
handed to ``on_layer`` (which transforms, quantizes and swaps its linears in place) and run
again to produce the next layer's inputs. Layer i+1 is therefore calibrated on the outputs of
the already *quantized* layers 0..i (GPTQ's sequential scheme), and only one layer sits on the
device at a time, so a model larger than the GPU can be quantized.
"""
from __future__ import annotations

import copy

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from mixq.data import find_data, network_available
from mixq.hf.models import LinearGroup, get_adapter
from mixq.validation import FLOAT_DTYPES, check_tensor

__all__ = ["LinearStats", "LayerStats", "StatsAccumulator", "calibration_batches",
           "calibrate_layerwise", "capture_layer_inputs", "wikitext2_text", "rows_to_raw_text"]


@dataclass
class LinearStats:
    """Statistics of one linear's input x (rows = tokens, K = in_features), over calibration data.

    Attributes:
        absmax: float32 (K,), ``max_t |x[t, c]|`` (the outlier statistic).
        mean_abs: float32 (K,), ``mean_t |x[t, c]|`` (AWQ's activation importance).
        std: float32 (K,), population std of ``x[t, c]`` over tokens.
        n_tokens: number of rows seen.
        inputs: float32 (n, K), n <= max_rows rows sampled uniformly without replacement from all
            rows seen (all of them when fewer), in order of arrival.
        hessian: float32 (K, K) ``2/n_tokens * X^T X`` over all rows, or None when not collected.
        sink_hessian: float32 (K, K) ``2/n_tokens * X_0^T X_0`` over the rows at the first
            position of each calibration sequence (the attention-sink token), the part of
            `hessian` they contribute; None when not collected (or inputs had no sequence dim).
        n_sequences: sequences seen (rows at position 0; 0 for 2-D inputs).
    """

    absmax: torch.Tensor
    mean_abs: torch.Tensor
    std: torch.Tensor
    n_tokens: int
    inputs: torch.Tensor
    hessian: torch.Tensor | None = None
    sink_hessian: torch.Tensor | None = None
    n_sequences: int = 0


class StatsAccumulator:
    """Running `LinearStats` of a stream of (rows, K) inputs (feed with `update`, read `finalize`).

    Sums are kept in float64 (float32 for the Hessian, on the input's device). The row sample is a
    reservoir: every row draws a uniform key and the `max_rows` largest keys are kept, which is
    uniform sampling without replacement whatever the batch sizes.
    """

    def __init__(self, k: int, *, max_rows: int = 4096, hessian: bool = False,
                 generator: torch.Generator | None = None) -> None:
        if not isinstance(max_rows, int) or isinstance(max_rows, bool) or max_rows < 0:
            raise ValueError(f"max_rows must be an int >= 0, got {max_rows!r}")
        self.k, self.max_rows, self.want_hessian = int(k), max_rows, hessian
        self.gen = generator if generator is not None else torch.Generator().manual_seed(0)
        self.n = 0
        self.absmax = self.sum_abs = self.sum = self.sum_sq = self.h = self.h_sink = None
        self.n_seq = 0
        self.rows: torch.Tensor | None = None      # (n, K) float32, sampled rows
        self.keys: torch.Tensor | None = None      # (n,) their random keys
        self.order: torch.Tensor | None = None     # (n,) arrival index, to keep rows in order

    def update(self, x: torch.Tensor) -> None:
        """Add rows: x (..., K) float; all leading dims are tokens. For x (B, T, K) (a layer's
        input) the rows x[:, 0] are the first token of each sequence (the sink Hessian)."""
        check_tensor(x, "x", dtypes=FLOAT_DTYPES)
        if x.shape[-1] != self.k:
            raise ValueError(f"x must have shape (..., {self.k}), got {tuple(x.shape)}")
        first = x.detach()[:, 0].reshape(-1, self.k).float() if x.dim() >= 3 else None
        x = x.detach().reshape(-1, self.k).float()
        if self.n == 0:
            z = torch.zeros(self.k, dtype=torch.float64, device=x.device)
            self.absmax = torch.zeros(self.k, dtype=torch.float32, device=x.device)
            self.sum_abs, self.sum, self.sum_sq = z.clone(), z.clone(), z.clone()
            if self.want_hessian:
                self.h = torch.zeros(self.k, self.k, dtype=torch.float32, device=x.device)
        a = x.abs()
        self.absmax = torch.maximum(self.absmax, a.amax(dim=0))
        # per-batch sums in fp32 (a few thousand rows), running totals in fp64
        self.sum_abs += a.sum(dim=0, dtype=torch.float64)
        self.sum += x.sum(dim=0, dtype=torch.float64)
        self.sum_sq += (x * x).sum(dim=0, dtype=torch.float64)
        if self.h is not None:
            self.h += x.T @ x
            if first is not None:
                if self.h_sink is None:
                    self.h_sink = torch.zeros_like(self.h)
                self.h_sink += first.T @ first
        if first is not None:
            self.n_seq += first.shape[0]
        if self.max_rows:
            self._sample(x)
        self.n += x.shape[0]

    def _sample(self, x: torch.Tensor) -> None:
        keys = torch.rand(x.shape[0], generator=self.gen).to(x.device)
        order = torch.arange(self.n, self.n + x.shape[0], device=x.device)
        if self.rows is not None and self.rows.shape[0] >= self.max_rows:
            keep = keys > self.keys.min()           # only these can enter a full reservoir
            x, keys, order = x[keep], keys[keep], order[keep]
        if self.rows is not None:
            x, keys, order = (torch.cat([self.rows, x]), torch.cat([self.keys, keys]),
                              torch.cat([self.order, order]))
        if x.shape[0] > self.max_rows:
            top = torch.topk(keys, self.max_rows).indices
            x, keys, order = x[top], keys[top], order[top]
        self.rows, self.keys, self.order = x, keys, order

    def finalize(self) -> LinearStats:
        """The `LinearStats` of everything fed so far (ValueError if nothing was)."""
        if self.n == 0:
            raise ValueError("StatsAccumulator.finalize: no input rows were recorded")
        n = self.n
        mean = self.sum / n
        var = (self.sum_sq / n - mean * mean).clamp_min(0.0)
        if self.rows is None:
            inputs = torch.zeros(0, self.k, dtype=torch.float32, device=self.absmax.device)
        else:
            inputs = self.rows[torch.argsort(self.order)]
        return LinearStats(absmax=self.absmax.clone(), mean_abs=(self.sum_abs / n).float(),
                           std=var.sqrt().float(), n_tokens=n, inputs=inputs,
                           hessian=None if self.h is None else self.h * (2.0 / n),
                           sink_hessian=None if self.h_sink is None else self.h_sink * (2.0 / n),
                           n_sequences=self.n_seq)


# ------------------------------------------------------------------------------- calibration data
SPLITS = {"test": "wiki.test.raw", "valid": "wiki.valid.raw", "validation": "wiki.valid.raw"}


def rows_to_raw_text(rows) -> str:
    """Rebuild a WikiText raw file from ``datasets`` rows: ``"".join(row or " \\n")``."""
    return "".join(r if r else " \n" for r in rows)


def wikitext2_text(split: str = "test") -> str:
    """WikiText-2 raw text of `split` ("test" | "valid"/"validation"), as in the raw files.

    The staged ``wikitext-2-raw/wiki.{test,valid}.raw`` as it is. If not staged and online, Hugging
    Face ``datasets`` ("wikitext", "wikitext-2-raw-v1") gives one row per line of that same file,
    keeping the line's ``"\\n"``, except blank lines which become ``""`` (the builder yields
    ``row if row.strip() else ""``); every blank line of the raw files is ``" \\n"``, so
    `rows_to_raw_text` rebuilds the raw file exactly (tests/test_eval.py checks this on the staged
    files). GPTQ's ``"\\n\\n".join(rows)`` is a different text (extra blank lines); not used.

    Raises:
        ValueError: unknown split.
        FileNotFoundError: not staged and no network.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    path = find_data(f"wikitext-2-raw/{SPLITS[split]}", required=False)
    if path is not None:
        return path.read_text(encoding="utf-8")
    if not network_available():
        find_data(f"wikitext-2-raw/{SPLITS[split]}")   # raises, listing where it looked
    from datasets import load_dataset
    hf_split = "validation" if split in ("valid", "validation") else split
    rows = load_dataset("wikitext", "wikitext-2-raw-v1", split=hf_split)["text"]
    return rows_to_raw_text(rows)


def calibration_batches(tokenizer, *, n_samples: int = 128, seqlen: int = 2048,
                        split: str = "valid", seed: int = 0) -> torch.Tensor:
    """Random windows of WikiText-2 token ids for calibration (GPTQ / AWQ practice).

    The whole split is tokenized once; `n_samples` start positions are drawn uniformly with
    ``random.Random(seed)`` and each sample is the `seqlen` tokens from there.

    Args:
        tokenizer: a Hugging Face tokenizer (callable returning ``input_ids``).
        n_samples: number of windows, >= 1.
        seqlen: tokens per window, >= 1; at most the number of tokens in the split.
        split: "valid" (default: calibrate on validation, evaluate on test) or "test".
        seed: RNG seed (same seed -> same batches).
    Returns:
        int64 (n_samples, seqlen).
    """
    for name, v in (("n_samples", n_samples), ("seqlen", seqlen)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    text = wikitext2_text(split)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if ids.numel() < seqlen:
        raise ValueError(f"seqlen={seqlen} exceeds the {ids.numel()} tokens of WikiText-2 {split}")
    rng = random.Random(seed)
    starts = [rng.randint(0, ids.numel() - seqlen) for _ in range(n_samples)]
    return torch.stack([ids[s:s + seqlen] for s in starts]).to(torch.int64)


# ------------------------------------------------------------------------------- layer inputs
class _StopForward(Exception):
    """Raised by the layer-0 pre-hook once its inputs are captured."""


def _to(obj, device):
    """Move tensors inside (nested) tuples/lists/dicts to `device`; leave other objects."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _move_outside(model: nn.Module, layers: nn.ModuleList, device) -> dict:
    """Move every parameter/buffer not inside `layers` to `device`; return their old devices."""
    inside = {id(t) for t in layers.parameters()} | {id(t) for t in layers.buffers()}
    old = {}
    for mod in model.modules():
        for store in (mod._parameters, mod._buffers):
            for key, t in store.items():
                if t is None or id(t) in inside:
                    continue
                old[(id(mod), key)] = t.device
                if t.device != torch.device(device):
                    if isinstance(t, nn.Parameter):
                        t.data = t.data.to(device)
                    else:
                        store[key] = t.to(device)
    return old


def _restore_outside(model: nn.Module, old: dict) -> None:
    for mod in model.modules():
        for store in (mod._parameters, mod._buffers):
            for key, t in store.items():
                dev = old.get((id(mod), key))
                if dev is None or t is None or t.device == dev:
                    continue
                if isinstance(t, nn.Parameter):
                    t.data = t.data.to(dev)
                else:
                    store[key] = t.to(dev)


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, batches: Sequence[torch.Tensor] | torch.Tensor, *,
                         batch_size: int = 1, device=None) -> list[tuple[tuple, dict]]:
    """Run the model up to decoder layer 0 and return its call arguments per chunk of rows.

    Args:
        model: a Hugging Face causal LM supported by `mixq.hf.models.get_adapter`.
        batches: int64 token ids (n, T), or a sequence of (T,) / (b, T) tensors.
        batch_size: rows per forward call.
        device: where the embeddings run and the captured tensors live (default: the model's).
    Returns:
        list of ``(args, kwargs)`` as layer 0 received them (hidden states first, plus the
        attention mask / position embeddings / position ids HF passes), on `device`.
    """
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    device = torch.device(device) if device is not None else _model_device(model)
    chunks = _chunks(batches, batch_size)
    captured: list[tuple[tuple, dict]] = []

    def hook(_mod, args, kwargs):
        captured.append((_to(args, device), _to(kwargs, device)))
        raise _StopForward

    old = _move_outside(model, layers, device)
    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in chunks:
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
        _restore_outside(model, old)
    if len(captured) != len(chunks):
        raise RuntimeError("decoder layer 0 was not called for every calibration batch")
    return captured


def _chunks(batches, batch_size: int) -> list[torch.Tensor]:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(batches, torch.Tensor):
        batches = [batches] if batches.dim() == 2 else [batches]
    rows: list[torch.Tensor] = []
    for i, b in enumerate(batches):
        check_tensor(b, f"batches[{i}]", ndim=(1, 2), dtypes=(torch.int64, torch.int32))
        rows.extend(b.reshape(-1, b.shape[-1]).long())
    if not rows:
        raise ValueError("batches is empty")
    out = []
    for s in range(0, len(rows), batch_size):
        part = rows[s:s + batch_size]
        if len({r.shape[0] for r in part}) != 1:
            raise ValueError("rows batched together must have the same length; use batch_size=1")
        out.append(torch.stack(part))
    return out


def _replace_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    """The call arguments with the hidden states (first positional, or kwarg) replaced."""
    if args:
        return (hidden,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _layer_output(out) -> torch.Tensor:
    """Decoder layers return a tensor (transformers >= 4.5x) or a tuple whose first item it is."""
    return out[0] if isinstance(out, (tuple, list)) else out


# ------------------------------------------------------------------------------- the layer loop
class LayerStats(dict):
    """``{name within the layer: LinearStats}`` for one decoder layer, re-computable.

    A plain dict for readers. The linears of one `LinearGroup` read the same input, so they
    share one `LinearStats` object (a method that rescales a group's inputs edits it once).
    `refresh()` re-runs the layer on its calibration inputs and
    recomputes every entry, e.g. after a method changed the float weights or norms (smoothing,
    rotation) so that later steps (outlier choice, GPTQ's Hessian) see the transformed inputs.
    Call it only while the group's linears are still the float nn.Linear modules of the layer.
    """

    def __init__(self, layer: nn.Module, groups: list[LinearGroup], inputs: list, *,
                 max_rows: int, collect_hessian: bool, generator: torch.Generator) -> None:
        super().__init__()
        self._layer, self._groups, self._inputs = layer, groups, inputs
        self._max_rows, self._hessian, self._gen = max_rows, collect_hessian, generator

    @torch.no_grad()
    def refresh(self) -> "LayerStats":
        """Recompute all stats on the layer as it is now; returns self."""
        accs: dict[str, StatsAccumulator] = {}
        handles = []
        for g in self._groups:   # the linears of a group read one input: hook the first
            acc = StatsAccumulator(g.linears[0].in_features, max_rows=self._max_rows,
                                   hessian=self._hessian, generator=self._gen)
            accs[g.names] = acc
            handles.append(g.linears[0].register_forward_pre_hook(
                lambda _m, args, acc=acc: acc.update(args[0])))
        try:
            for args, kwargs in self._inputs:
                self._layer(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
        self.clear()
        for names, acc in accs.items():
            st = acc.finalize()
            self.update({n: st for n in names})
        return self


def _hidden(batch) -> torch.Tensor:
    """The hidden states of one layer call ``(args, kwargs)`` (first positional, or kwarg)."""
    args, kwargs = batch
    return args[0] if args else kwargs["hidden_states"]


@torch.no_grad()
def _layer_error(float_layer: nn.Module, batch, out: torch.Tensor) -> dict:
    """rel_err = ||f_q(h) - f(h)|| / ||f(h) - h|| on one calibration batch (see `layer_errors`);
    `out` is f_q(h), the transformed layer's output that the layer loop already computed."""
    args, kwargs = batch
    ref = _layer_output(float_layer(*args, **kwargs)).float()
    update = (ref - _hidden(batch).float()).norm()
    return {"rel_err": float((out.float() - ref).norm() / update.clamp(min=1e-12)),
            "update_norm": float(update)}


OnLayer = Callable[[int, nn.Module, list[LinearGroup], dict[str, LinearStats]], None]


@torch.no_grad()
def calibrate_layerwise(model: nn.Module, batches, *, on_layer: OnLayer,
                        collect_hessian: bool = False, max_rows: int = 4096, device=None,
                        batch_size: int = 1, seed: int = 0, progress: bool = True,
                        layer_errors: list | None = None) -> None:
    """Calibrate and transform `model` one decoder layer at a time (see the module docstring).

    For each layer i: stats of every linear in ``adapter.linear_groups(layer)`` are collected
    on the current inputs, then ``on_layer(i, layer, groups, stats)`` is called with stats keyed
    by the linear's name within the layer ("self_attn.q_proj"); it may edit the layer in place
    (fold scales, swap linears for quantized modules); ``stats`` is a `LayerStats` (a dict whose
    ``refresh()`` recomputes it on the transformed layer). The layer is then re-run on the same
    inputs to produce the inputs of layer i+1.

    Args:
        model: a supported Hugging Face causal LM (any device; eval mode is set).
        batches: int64 token ids (n, T) or a sequence of (T,) / (b, T) tensors.
        on_layer: callback, see above.
        collect_hessian: also accumulate ``H = 2/n X^T X`` per linear (GPTQ).
        max_rows: rows of real inputs kept per linear (`LinearStats.inputs`).
        device: where each layer runs (default: the model's device). Layers are moved there one
            at a time and back to where they were.
        batch_size: rows of `batches` per forward call.
        seed: seed of the row sampling.
        progress: show a tqdm bar over layers.
        layer_errors: if a list, one dict per layer is appended: the relative error of the
            transformed layer's residual update against a float copy of the layer, on the same
            (already quantized-upstream) inputs of the first calibration batch::

                rel_err_i = ||f_q(h) - f(h)||_F / ||f(h) - h||_F     (f: the decoder layer)

            This is the error layer i adds by itself, so the largest values show which layers
            dominate (costs a copy of the layer and one float forward of it on the first batch;
            the quantized output is the one the loop computes anyway).
    """
    if not callable(on_layer):
        raise TypeError(f"on_layer must be callable, got {type(on_layer).__name__}")
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    model.eval()
    device = torch.device(device) if device is not None else _model_device(model)
    inputs = capture_layer_inputs(model, batches, batch_size=batch_size, device=device)
    gen = torch.Generator().manual_seed(seed)
    for i in tqdm(range(len(layers)), desc="calibrate layers", disable=not progress):
        layer = layers[i]
        home = _model_device(layer)
        layer.to(device)
        groups = adapter.linear_groups(layer)
        stats = LayerStats(layer, groups, inputs, max_rows=max_rows,
                           collect_hessian=collect_hessian, generator=gen)
        stats.refresh()
        float_layer = copy.deepcopy(layer) if layer_errors is not None else None
        on_layer(i, layer, groups, stats)
        del stats
        first = inputs[0]
        for j, (args, kwargs) in enumerate(inputs):
            inputs[j] = _replace_hidden(args, kwargs, _layer_output(layer(*args, **kwargs)))
        if float_layer is not None:
            layer_errors.append({"layer": i, **_layer_error(float_layer, first, _hidden(inputs[0]))})
            del float_layer
        layer.to(home)
        if device.type == "cuda":
            torch.cuda.empty_cache()
