"""Triton kernels for mixq (CUDA; or CPU tensors under TRITON_INTERPRET=1).

Public API (each launcher validates its inputs and is a torch custom op, so torch.compile works):

* `quantize_pack_int4(w, spec)`: (N, K) float -> packed int4 uint8 (N, ceil(K/2)) + fp16 scales.
* `act_quant(x, n_outliers=k | outlier_idx=idx)`: per-token int4 activations (packed or int8),
  fp16 per-token scales, and the fp16 outlier channels, in one pass.
* `w4a16_matmul(x, w_packed, w_scale, group_size)`: x @ dequant(W_int4).T (gemv / decode /
  GEMM regimes by M); `dequantize_int4` gives the dense weight.
* `w4a4_matmul` (module `w4a4`, kernels-b).

Submodules are imported on first attribute access, so ``import mixq.kernels._triton`` stays light.
`import mixq` never imports this package.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "PackedInt4": "pack",
    "quantize_pack_int4": "pack",
    "int4_container_view": "pack",
    "act_quant": "act_quant",
    "outlier_gather_index": "act_quant",
    "w4a16_matmul": "w4a16",
    "w4a16_regime": "w4a16",
    "dequantize_int4": "w4a16",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
