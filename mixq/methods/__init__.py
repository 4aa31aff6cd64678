"""PTQ methods: transforms (SmoothQuant, AWQ, rotation) and weight quantizers (RTN, clip, GPTQ)
applied per decoder layer through `LayerContext` (see mixq.methods.base for the protocol)."""
from mixq.methods.awq import AWQ
from mixq.methods.base import LayerContext, Method, fold_scale, output_error, quantized_output
from mixq.methods.clip import Clip
from mixq.methods.gptq import GPTQ
from mixq.methods.layerwise import LayerwiseQuant
from mixq.methods.outlier_channels import OutlierChannels
from mixq.methods.rotation import Rotation, hadamard
from mixq.methods.rtn import RTN
from mixq.methods.smoothquant import SmoothQuant

__all__ = ["LayerContext", "Method", "fold_scale", "output_error", "quantized_output", "RTN",
           "SmoothQuant", "AWQ", "Clip", "GPTQ", "Rotation", "hadamard",
           "OutlierChannels", "LayerwiseQuant"]
