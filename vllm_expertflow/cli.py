"""`vllm-expertflow` command line: one subcommand per tool module."""

from __future__ import annotations

import argparse
import importlib
import logging

# Each module exposes `add_arguments(parser)` and `run(args) -> int`; imported lazily so that
# `vllm-expertflow --help` does not pay for torch or vllm.
SUBCOMMANDS = {
    "build-demo-model": ("vllm_expertflow.tools.build_demo_model", "train the demo Qwen3-MoE"),
    "trace": ("vllm_expertflow.tools.trace", "record routing traces with the real engine"),
    "bench": ("vllm_expertflow.tools.bench", "decode/prefill speed against the stock backend"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-expertflow")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = commands.add_parser(name, help=help_text)
        sub.set_defaults(module_name=module_name)
    known, _ = parser.parse_known_args(argv)
    module = importlib.import_module(known.module_name)
    module.add_arguments(commands.choices[known.command])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return module.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
