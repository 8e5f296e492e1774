"""`vllm-expertflow serve-ray MODEL --replicas N`: N ExpertFlow engines behind one endpoint.

Options after `--` go to every replica's `vllm serve`, e.g.
`vllm-expertflow serve-ray MODEL --replicas 2 -- --enforce-eager --max-model-len 512`.
"""

from __future__ import annotations

import argparse
import logging
import signal
import time

from ..serving.routing import POLICIES

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _add_options(parser)
    # argparse cannot put options between a positional and `--`, so MODEL and all after it
    # are taken raw here and split in `run`.
    parser.add_argument(
        "rest",
        nargs=argparse.REMAINDER,
        metavar="MODEL [options] [-- vllm serve options]",
        help="model folder or name, as for `vllm serve`",
    )


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--routing", choices=sorted(POLICIES), default="round-robin")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--omp-bind",
        default="per-replica",
        help="VLLM_CPU_OMP_THREADS_BIND for the engines: 'per-replica' pins replica i to core "
        "i mod cores; any other value (e.g. 'nobind', 'auto') is passed to every engine",
    )
    parser.add_argument(
        "--load-penalty",
        type=float,
        default=0.25,
        help="expert-affinity: score lost per request in flight above the least-loaded replica",
    )


def parse_rest(args: argparse.Namespace) -> argparse.Namespace:
    """Adds `model` and `serve_args` from `args.rest`, with options given after MODEL."""
    rest = args.rest
    split = rest.index("--") if "--" in rest else len(rest)
    parser = argparse.ArgumentParser(prog="vllm-expertflow serve-ray")
    parser.add_argument("model")
    _add_options(parser)
    # Values already on `args` (options given before MODEL) stand as the defaults.
    parsed = parser.parse_args(rest[:split], namespace=argparse.Namespace(**vars(args)))
    parsed.serve_args = rest[split + 1 :]
    return parsed


def run(args: argparse.Namespace) -> int:
    from ..serving.app import build_app, start, stop

    args = parse_rest(args)
    app = build_app(
        args.model, args.replicas, args.serve_args, args.routing, args.omp_bind, args.load_penalty
    )
    # SIGTERM unwinds like Ctrl-C, so Serve's replicas (and their engines) are shut down.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        start(app, args.host, args.port)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        logger.info("shutting down")
    finally:
        stop()
    return 0
