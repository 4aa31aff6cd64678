"""mixq: W4A4 quantization with FP16 outlier channels, a fake-quant reference and Triton kernels.

`import mixq` never imports Triton: the reference runs anywhere; kernels load on first use.
"""
from mixq.config import QuantSpec

__version__ = "0.1.0"
__all__ = ["QuantSpec", "__version__"]
