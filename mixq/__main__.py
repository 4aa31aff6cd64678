"""Command line: ``python -m mixq <command> ...``.

Commands:
    mnist [--json PATH] [--smoke] [--figure PATH]   train + quantize the MNIST MLP, print the table
    bench gemm [ARGS...]                            GEMM benchmarks (forwarded to mixq.bench.main)
    bench e2e [ARGS...]                             end-to-end tokens/s + memory (mixq.bench_e2e)
    bench attention [ARGS...]                       attention prefill/decode vs SDPA (mixq.bench_attention)
    report [--results DIR] [--figures DIR] [--readme PATH] [--check]
                                                    figures + README results tables (mixq.report)
    quantize [ARGS...]                              quantize a Hugging Face LLM (mixq.cli_llm)
    eval [ARGS...]                                  WikiText-2 perplexity / speed (mixq.cli_llm)
    sweep [ARGS...]                                 the LLM results matrix (mixq.sweep)
    full [ARGS...]                                  full-architecture W4A4 steps (mixq.full)

Thin on purpose: every command parses its flags and calls one library function.
"""
from __future__ import annotations

import argparse
import sys
import time


def _cmd_mnist(args: argparse.Namespace) -> int:
    from mixq import mnist

    t0 = time.perf_counter()
    figure = args.figure or mnist.DEFAULT_FIGURE
    rows = mnist.run_pipeline(smoke=True if args.smoke else None, json_path=args.json,
                              figure_path=figure)
    print(mnist.format_table(rows))
    print(f"\nwall time: {time.perf_counter() - t0:.1f} s"
          + (f"; rows written to {args.json}" if args.json else "")
          + f"; figure {figure}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "attention":
        from mixq import bench_attention  # lazy: pulls in the kernels and transformers
        return int(bench_attention.main(["attention", *args.rest]) or 0)
    if args.what == "e2e":
        from mixq import bench_e2e  # lazy: pulls in transformers
        return int(bench_e2e.main(["e2e", *args.rest]) or 0)
    try:
        from mixq import bench  # lazy: pulls in the kernels
    except ModuleNotFoundError as e:
        if e.name != "mixq.bench":
            raise
        print("python -m mixq bench: mixq.bench is not available in this install", file=sys.stderr)
        return 2
    rc = bench.main([args.what, *args.rest])
    return int(rc or 0)


def _cmd_report(args: argparse.Namespace) -> int:
    from mixq import report  # lazy: pulls in matplotlib / seaborn

    return int(report.main(args.rest) or 0)


def _cmd_llm(args: argparse.Namespace) -> int:
    if args.command == "sweep":
        from mixq import sweep  # lazy: pulls in transformers
        return int(sweep.main(args.rest) or 0)
    from mixq import cli_llm

    run = cli_llm.quantize_main if args.command == "quantize" else cli_llm.eval_main
    return int(run(args.rest) or 0)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``python -m mixq``."""
    parser = argparse.ArgumentParser(prog="python -m mixq",
                                     description="mixq: W4A4 quantization with FP16 outliers")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("mnist", help="train, quantize and evaluate the MNIST MLP")
    p.add_argument("--json", metavar="PATH", default=None, help="write the rows as JSON here")
    p.add_argument("--smoke", action="store_true",
                   help="small and fast run (also on with MIXQ_SMOKE=1)")
    p.add_argument("--figure", metavar="PATH", default=None,
                   help="accuracy-vs-outliers plot (default: figures/mnist_accuracy_vs_outliers.png)")
    p.set_defaults(func=_cmd_mnist)

    p = sub.add_parser("bench", help="benchmarks (mixq.bench)")
    p.add_argument("what", choices=["gemm", "e2e", "attention"], help="which benchmark")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for mixq.bench.main")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("report", help="figures and README results tables from results/*.json",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for mixq.report.main")
    p.set_defaults(func=_cmd_report)

    for name, what in (("quantize", "quantize a Hugging Face LLM and save it"),
                       ("eval", "WikiText-2 perplexity and speed of a (quantized) LLM"),
                       ("sweep", "the LLM results matrix: every method and outlier fraction")):
        p = sub.add_parser(name, help=what, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER,
                       help=f"arguments for mixq.cli_llm ({name} --help lists them)")
        p.set_defaults(func=_cmd_llm)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("quantize", "eval", "sweep"):
        # forwarded whole: argparse's REMAINDER would swallow flags such as --help itself
        return _cmd_llm(argparse.Namespace(command=argv[0], rest=argv[1:]))
    if argv and argv[0] == "full":
        from mixq import full  # lazy: pulls in transformers
        return int(full.main(argv[1:]) or 0)
    if argv and argv[0] == "report":   # forwarded whole, like the LLM commands
        return _cmd_report(argparse.Namespace(rest=argv[1:]))
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
