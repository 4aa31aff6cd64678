"""The reference: pure-PyTorch math that every Triton kernel is tested against (no Triton here).

* `mixq.reference.linear` -- quantized linear layers (W4A4 + FP16 outliers, W4A16, W8A8),
  re-exported here: ``mixq.reference.w4a4_linear``.
* `mixq.reference.attention` -- quantized attention (int QK^T, uint8 P).
* `mixq.reference.kv_cache` -- the 4-bit KIVI cache layout: quantize / dequantize K and V.
* `mixq.reference.norm` -- RMSNorm / LayerNorm and the activation quantization that follows.
"""
from mixq.reference.linear import (dequantize_weight, int_matmul, quantize_per_token,
                                   w4a4_linear, w4a16_linear, w8a8_linear)

__all__ = ["quantize_per_token", "int_matmul", "w4a4_linear", "w4a16_linear", "w8a8_linear",
           "dequantize_weight"]
