"""mixq: W4A4 quantization with FP16 outlier channels, a fake-quant reference and Triton kernels.

The API in five lines::

    import mixq
    model, tok = mixq.load_model("smollm2")                       # or any HF Llama/OPT id
    cfg = mixq.QuantConfig(mode="w4a4", outlier_frac=0.01)         # W4A4 + 1% FP16 channels
    mixq.quantize(model, cfg, calib_data)                          # calibrate, transform, swap
    mixq.save_quantized(model, "out/"); mixq.perplexity(model, tok)

`import mixq` never imports Triton: the reference runs anywhere; kernels load on first use
(on CUDA). Heavier pieces (transformers) are imported when first used.
"""
from __future__ import annotations

import importlib

from mixq.config import AttentionQuantConfig, KVCacheSpec, QuantConfig, QuantSpec

__version__ = "0.1.0"

# name -> module, imported on first access so `import mixq` stays light
_LAZY = {
    "quantize": "mixq.api",
    "save_quantized": "mixq.io",
    "load_quantized": "mixq.io",
    "perplexity": "mixq.eval",
    "load_model": "mixq.io",
    "enable_quantized_attention": "mixq.hf.attention",
    "disable_quantized_attention": "mixq.hf.attention",
    "KV4Cache": "mixq.hf.kv_cache",
    "fuse_norm_quant": "mixq.hf.norm_fusion",
    "make_cache": "mixq.api",
    "PRESETS": "mixq.presets",
    "preset": "mixq.presets",
}

__all__ = ["QuantSpec", "QuantConfig", "KVCacheSpec", "AttentionQuantConfig", "__version__",
           *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mixq' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
