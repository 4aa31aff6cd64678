"""PTQ methods applied per decoder layer through `LayerContext` (protocol: mixq.methods.base).

Transforms (float function unchanged): SmoothQuant, AWQ, Rotation. Weight quantizers (fill
``ctx.qweights``): RTN, Clip, GPTQ. Mixed-precision decisions: OutlierChannels (FP16 input
channels), LayerwiseQuant (chosen kinds / layers at W8A8). Order in ``config.methods``:
decisions and transforms first, then at most one weight quantizer per linear.
"""
from mixq.methods.adaround import AdaRound
from mixq.methods.awq import AWQ
from mixq.methods.awq_dynamic import AWQDynamic
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
           "OutlierChannels", "LayerwiseQuant", "AdaRound", "AWQDynamic"]
