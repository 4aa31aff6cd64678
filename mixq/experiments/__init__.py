"""Experiment drivers, one per ``python -m mixq <command>`` (`mixq.__main__.COMMANDS`): mnist,
bench_gemm, bench_e2e, bench_attention, report, quantize, evaluate (``eval``), sweep, full,
ablation; plots draws the figures of the report and the notebooks. Each command module has
``build_parser()`` and ``main(argv) -> int``; all share `mixq.experiments.common` (environment
metadata, result files, Markdown tables, the common flags, GPU timing). The library (`mixq`)
never imports them."""
