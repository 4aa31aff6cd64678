"""Outlier and salient channels: which input channels to keep in FP16 next to the int4 ones.

Why outliers matter
-------------------
In large language models a handful of *activation channels* (columns of x (M, K)) carry
values 10-100x larger than the rest, and they do so for almost every token (LLM.int8(),
Dettmers et al. 2022: magnitudes >= 6 in a few fixed hidden dims once models pass ~6.7B
parameters). SmoothQuant (Xiao et al. 2022) made the same observation: the outliers sit in
fixed *channels*, not random tokens, while weights are smooth. With one scale per token, a
single outlier channel sets the absmax of every row, so the int4 step ``s = absmax / 7`` gets
so coarse that all ordinary channels round to 0 or +-1: the error explodes.

Mixed precision fixes this cheaply: keep the k outlier channels of x (and the matching k
columns of W) in FP16 and quantize only the remaining ``K - k`` channels to int4::

    y = x @ W^T = x[:, reg] @ W[:, reg]^T  +  x[:, out] @ W[:, out]^T
                  '------ int4 x int4 -----'  '------ fp16 x fp16 ------'

How outlier channels are chosen
-------------------------------
* `outliers_by_threshold`: LLM.int8()-style, every channel with some ``|x| >= threshold``.
* `outliers_topk`: a fixed count (or fraction) of channels ranked by a per-channel statistic
  gathered on calibration data (*static*: fixed at quantization time).
* `dynamic_outliers`: the same ranking by ``max |x|`` of the current batch (*dynamic*).
* `salient_weight_channels`: rank input channels by the weights instead, with the sorting
  strategies "max", "mean3std" and "argmax" (see its docstring).

Making the split free: permute channels
---------------------------------------
A GEMM kernel wants contiguous parts, ``x = [int4 part | fp16 part]``. `outlier_permutation`
builds the channel order (regular channels first, outliers last), `split_outliers` cuts a
permuted tensor, and `permute_linear_pair` folds the permutation into the *previous* layer's
output rows, so at inference the activations come out already permuted at no cost.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from mixq.validation import FLOAT_DTYPES, check_tensor

__all__ = ["outliers_by_threshold", "outliers_topk", "dynamic_outliers", "channel_max",
           "salient_weight_channels", "weight_channel_stat", "SALIENT_STRATEGIES",
           "outlier_permutation", "split_outliers", "permute_linear_pair", "resolve_k"]

SALIENT_STRATEGIES = ("max", "mean3std", "argmax")


def _check_act(x: torch.Tensor, name: str = "x") -> torch.Tensor:
    """(..., K) activations -> (rows, K) float32 view of |x|."""
    check_tensor(x, name, ndim=(2, 3), dtypes=FLOAT_DTYPES, finite=True)
    return x.detach().reshape(-1, x.shape[-1]).float().abs()


def resolve_k(n_channels: int, k: int | None = None, fraction: float | None = None) -> int:
    """Number of channels to pick: `k` itself, or ``ceil(fraction * n_channels)``.

    Exactly one of `k` (0..n_channels) and `fraction` (0..1) must be given. A tiny tolerance
    keeps exact products exact (fraction 0.3 of 10 -> 3, not 4).
    """
    if (k is None) == (fraction is None):
        raise ValueError(f"give exactly one of k and fraction, got k={k!r}, fraction={fraction!r}")
    if k is not None:
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= n_channels:
            raise ValueError(f"k must be an int in [0, {n_channels}] (number of channels), got {k!r}")
        return k
    if not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be a number in [0, 1], got {fraction!r}")
    return min(n_channels, math.ceil(fraction * n_channels - 1e-9))


def outliers_by_threshold(x: torch.Tensor, threshold: float = 6.0) -> torch.Tensor:
    """LLM.int8() outlier channels: every channel where some ``|x[m, c]| >= threshold``.

    Args:
        x: (M, K) (or (B, T, K)) float activations, finite.
        threshold: magnitude threshold (> 0); LLM.int8() uses 6.0.
    Returns:
        int64 (k,) channel indices, ascending (k may be 0).
    """
    a = _check_act(x)
    if not isinstance(threshold, (int, float)) or not math.isfinite(threshold) or threshold <= 0:
        raise ValueError(f"threshold must be a finite number > 0, got {threshold!r}")
    return torch.nonzero(a.amax(dim=0) >= threshold).flatten().to(torch.int64)


def outliers_topk(channel_stat: torch.Tensor, *, k: int | None = None,
                  fraction: float | None = None) -> torch.Tensor:
    """Static outliers: the k channels with the largest calibration statistic.

    Ranking is by `channel_stat` descending; ties go to the lower channel index (stable sort).

    Args:
        channel_stat: (K,) float, one statistic per channel from calibration data (e.g. the
            running max of |x|), finite.
        k: number of channels (0..K); or
        fraction: fraction of channels, ``k = ceil(fraction * K)``.
    Returns:
        int64 (k,) channel indices, ascending.
    """
    check_tensor(channel_stat, "channel_stat", ndim=1, dtypes=FLOAT_DTYPES, finite=True)
    n = resolve_k(channel_stat.shape[0], k, fraction)
    order = torch.sort(channel_stat.detach().float(), descending=True, stable=True).indices
    return torch.sort(order[:n]).values.to(torch.int64)


def channel_max(x: torch.Tensor) -> torch.Tensor:
    """Per-channel ``max |x|`` over all tokens: (M, K) or (B, T, K) float -> float32 (K,)."""
    return _check_act(x).amax(dim=0)


def dynamic_outliers(x: torch.Tensor, *, k: int | None = None,
                     fraction: float | None = None) -> torch.Tensor:
    """Dynamic outliers: the k channels of *this batch* with the largest ``max |x|``.

    Equals ``outliers_topk(channel_max(x), k=k, fraction=fraction)``.

    Args:
        x: (M, K) (or (B, T, K)) float activations, finite.
        k, fraction: as in `outliers_topk`.
    Returns:
        int64 (k,) channel indices, ascending.
    """
    return outliers_topk(channel_max(x), k=k, fraction=fraction)


def weight_channel_stat(w: torch.Tensor, strategy: str = "max") -> torch.Tensor:
    """Per input channel saliency score of a weight W (N, K), used to rank channels.

    * "max":      ``max_n |W[n, c]|``.
    * "mean3std": ``mean_n |W[n, c]| + 3 * std_n |W[n, c]|`` (population std, so N=1 works):
      a robust "upper edge" of the channel's distribution.
    * "argmax":   number of rows n whose largest ``|W[n, :]|`` sits in channel c (first index
      on ties within a row), i.e. for how many output neurons c is the dominant input.

    Args:
        w: (N, K) float, finite.
        strategy: one of `SALIENT_STRATEGIES`.
    Returns:
        float32 (K,) (integer-valued counts for "argmax").
    """
    check_tensor(w, "w", ndim=2, dtypes=FLOAT_DTYPES, finite=True)
    if strategy not in SALIENT_STRATEGIES:
        raise ValueError(f"strategy must be one of {SALIENT_STRATEGIES}, got {strategy!r}")
    a = w.detach().float().abs()
    if strategy == "max":
        return a.amax(dim=0)
    if strategy == "mean3std":
        return a.mean(dim=0) + 3.0 * a.std(dim=0, correction=0)
    counts = torch.bincount(a.argmax(dim=1), minlength=a.shape[1])
    return counts.float()


def salient_weight_channels(w: torch.Tensor, fraction: float, strategy: str = "max") -> torch.Tensor:
    """Salient input channels of a weight W (N, K): the top ``ceil(fraction * K)`` by a score.

    Scores are `weight_channel_stat` (strategy "max", "mean3std" or "argmax"). For "argmax",
    channels with equal counts are ordered by "max" (``max_n |W[n, c]|``), then by index;
    for the others ties go to the lower index.

    Args:
        w: (N, K) float weight, finite.
        fraction: in [0, 1].
        strategy: "max" | "mean3std" | "argmax".
    Returns:
        int64 (k,) channel indices, ascending.
    """
    stat = weight_channel_stat(w, strategy)
    n = resolve_k(w.shape[1], None, fraction)
    if strategy != "argmax":
        return outliers_topk(stat, k=n)
    # Lexicographic (count desc, max desc, index asc) via two stable sorts: minor key first.
    by_max = torch.sort(weight_channel_stat(w, "max"), descending=True, stable=True).indices
    order = by_max[torch.sort(stat[by_max], descending=True, stable=True).indices]
    return torch.sort(order[:n]).values.to(torch.int64)


def outlier_permutation(K: int, outlier_idx: torch.Tensor) -> torch.Tensor:
    """Channel order that puts the outlier channels last: ``x[:, perm] = [int4 part | fp16 part]``.

    ``perm = [regular channels in ascending order] + [outlier_idx in the order given]``.

    Args:
        K: number of channels.
        outlier_idx: (k,) integer tensor of distinct channel indices in [0, K).
    Returns:
        int64 (K,) permutation (on outlier_idx's device).
    """
    if not isinstance(K, int) or isinstance(K, bool) or K < 1:
        raise ValueError(f"K must be a positive int, got {K!r}")
    check_tensor(outlier_idx, "outlier_idx", ndim=1, nonempty=False,
                 dtypes=(torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8))
    idx = outlier_idx.to(torch.int64)
    if idx.numel():
        if int(idx.min()) < 0 or int(idx.max()) >= K:
            raise ValueError(f"outlier_idx must be in [0, {K}), got range "
                             f"[{int(idx.min())}, {int(idx.max())}]")
        if torch.unique(idx).numel() != idx.numel():
            raise ValueError("outlier_idx has duplicate channels")
    is_out = torch.zeros(K, dtype=torch.bool, device=idx.device)
    is_out[idx] = True
    regular = torch.nonzero(~is_out).flatten()
    return torch.cat([regular, idx])


def split_outliers(x: torch.Tensor, n_outliers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a permuted tensor (..., K) into ``(x[..., :K-k], x[..., K-k:])`` = (int4 part, fp16 part).

    Works for activations (M, K) and weights (N, K) alike (views, no copy).

    Args:
        x: (..., K) tensor whose last dim was permuted with `outlier_permutation`.
        n_outliers: k, 0..K.
    """
    check_tensor(x, "x", nonempty=False)
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dim (channels last), got a 0-d tensor")
    kk = x.shape[-1]
    if not isinstance(n_outliers, int) or isinstance(n_outliers, bool) or not 0 <= n_outliers <= kk:
        raise ValueError(f"n_outliers must be an int in [0, {kk}] for x of shape {tuple(x.shape)}, "
                         f"got {n_outliers!r}")
    return x[..., :kk - n_outliers], x[..., kk - n_outliers:]


def permute_linear_pair(prev: nn.Linear, next: nn.Linear, perm: torch.Tensor) -> tuple[nn.Linear, nn.Linear]:
    """Fold a channel permutation into two consecutive linears, in place, keeping the function.

    ``prev`` produces the hidden channels that ``next`` consumes. Permuting prev's output rows
    (and bias) by `perm` makes it emit ``h[:, perm]``; permuting next's input columns the same
    way gives ``h[:, perm] @ W_next[:, perm]^T = h @ W_next^T``. Anything between the two
    layers must act elementwise per channel (e.g. ReLU/GELU), which commutes with the
    permutation; a norm with per-channel weights must be permuted too (not done here).

    Args:
        prev: nn.Linear with ``out_features == K``.
        next: nn.Linear with ``in_features == K``.
        perm: int64 (K,) permutation, e.g. from `outlier_permutation`.
    Returns:
        ``(prev, next)``, the same modules, modified in place.
    """
    for name, layer in (("prev", prev), ("next", next)):
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"{name} must be a torch.nn.Linear, got {type(layer).__name__}")
    kk = prev.out_features
    if next.in_features != kk:
        raise ValueError(f"prev.out_features ({kk}) must equal next.in_features ({next.in_features})")
    check_tensor(perm, "perm", ndim=1, dtypes=(torch.int64, torch.int32))
    if perm.shape[0] != kk or not torch.equal(torch.sort(perm.cpu()).values, torch.arange(kk)):
        raise ValueError(f"perm must be a permutation of range({kk}), got shape {tuple(perm.shape)}")
    with torch.no_grad():
        p = perm.to(device=prev.weight.device, dtype=torch.int64)
        prev.weight.copy_(prev.weight[p])
        if prev.bias is not None:
            prev.bias.copy_(prev.bias[p])
        p = perm.to(device=next.weight.device, dtype=torch.int64)
        next.weight.copy_(next.weight[:, p])
    return prev, next
