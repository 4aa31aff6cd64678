"""Quantized modules: drop-in linears (`mixq.nn.linear`) and the norm that quantizes its output
for them (`mixq.nn.norm`). Built once from a float module; the forward runs the Triton kernels
on CUDA and the reference elsewhere."""
from mixq.nn.linear import (DEFAULT_W4_SPEC, DEFAULT_W8_SPEC, DERIVED_BUFFERS, W4A4_WEIGHT_BLOCK,
                            WEIGHT_LAYOUT_W4A4, FP16Linear, QuantLinearBase, RotatedInputLinear,
                            W4A4Linear, W4A16Linear, W8A8Linear, module_memory_bytes,
                            module_weight_nbytes, quantize_linear)
from mixq.nn.norm import QuantNorm, attach_consumers, relink_consumers, take_prequantized
from mixq.nn.stacked import StackedLinear, StackedPart, stack_problem

__all__ = ["QuantLinearBase", "FP16Linear", "W8A8Linear", "W4A16Linear", "W4A4Linear",
           "RotatedInputLinear", "DEFAULT_W4_SPEC", "DEFAULT_W8_SPEC", "quantize_linear", "module_weight_nbytes", "module_memory_bytes",
           "DERIVED_BUFFERS", "W4A4_WEIGHT_BLOCK", "WEIGHT_LAYOUT_W4A4", "QuantNorm", "attach_consumers",
           "relink_consumers", "take_prequantized", "StackedLinear", "StackedPart", "stack_problem"]
