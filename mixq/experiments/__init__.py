"""Experiment drivers behind ``python -m mixq <command>``: sweep, full, bench (gemm, e2e,
attention), report, plots, the LLM CLI (quantize, eval), the MNIST pipeline and the layer
ablation. They share `mixq.experiments.common` (environment metadata, result files, Markdown
tables, flags). The library (`mixq`) never imports them."""
