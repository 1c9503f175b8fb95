"""moe-serve: an OpenAI-compatible HTTP server over the runtime (continuous batching, streaming, metrics).

  moe-serve MODEL_DIR --plan PLAN_DIR [--host 127.0.0.1] [--port 8000] [--max-batch B] [--max-waiting N]
            [--api-key KEY] [--served-model-name NAME] [--chat-template FILE|chatml] [run options of moe-run]
"""
from __future__ import annotations

import gc
import sys

from artifacts.errors import UserError, check_range, cli_parser, run_cli
from runtime.cli import add_run_options, run_config

PROG = "moe-serve"


def _parser():
    ap = cli_parser(PROG, "Serve a MoE checkpoint with offloaded experts over an OpenAI-compatible HTTP API.")
    add_run_options(ap)
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--max-batch", type=int, default=None,
                    help="rows decoded together (default: the plan's batch, else 1)")
    ap.add_argument("--max-waiting", type=int, default=64, help="requests queued beyond the batch; more get 429")
    ap.add_argument("--max-body", default="1MiB", help="largest request body; larger get 413")
    ap.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    ap.add_argument("--served-model-name", default=None, help="the model id clients pass (default: the dir name)")
    ap.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"))
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run_cli(PROG, lambda: _run(args))


def _run(args) -> int:
    from pathlib import Path

    from artifacts.units import parse_bytes

    try:
        import uvicorn

        from runtime.server.app import ServeConfig, build_app
    except ImportError as exc:
        raise UserError(f"moe-serve needs the serve extra ({exc.name} is missing): pip install 'understudy[serve]'"
                        ) from None
    from runtime.chat import load_template
    from runtime.engine import Engine
    from runtime.runtime import Runtime

    config = run_config(args)
    check_range(args.port, "--port", 0, 65535)
    check_range(args.max_waiting, "--max-waiting", 0)
    if args.max_batch is not None:
        check_range(args.max_batch, "--max-batch", 1)
    max_body = parse_bytes(args.max_body, "--max-body")
    cfg = ServeConfig(model_name=args.served_model_name or Path(args.model_dir).resolve().name, api_key=args.api_key,
                      max_body_bytes=max_body, chat_template=load_template(args.chat_template))
    _check_port(args.host, args.port)   # before the model loads
    rt = Runtime.load(args.model_dir, config)
    max_batch = args.max_batch or (rt.plan.choices.batch if rt.plan is not None else 1)
    if rt.budget is not None:
        print(f"{PROG}: {rt.budget.describe()}", file=sys.stderr)
    if rt.plan is not None and max_batch > rt.plan.choices.batch:
        print(f"{PROG}: warning: --max-batch {max_batch} is over the batch the plan was compiled for "
              f"({rt.plan.choices.batch}); the expert cache stays within its budget, but the KV cache of {max_batch} "
              f"rows can outgrow the plan's memory split: moe-compile --batch {max_batch}", file=sys.stderr)
    # Everything alive now (the libraries, the model, the runtime) lives as long as the server: freeze it out of the
    # cyclic collector, whose full collections would otherwise traverse it all inside some request's decode step
    # (benchmarks/overhead.py prints the count and one collection's pause for its own process, which holds several
    # models).
    gc.collect()
    gc.freeze()
    engine = Engine(rt, max_batch=max_batch, max_waiting=args.max_waiting).start()
    print(f"{PROG}: serving {cfg.model_name!r} ({config.resolved_policy}, batch up to {max_batch}) on "
          f"http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    try:
        uvicorn.run(build_app(engine, cfg), host=args.host, port=args.port, log_level=args.log_level,
                    timeout_graceful_shutdown=5)
    finally:
        engine.close()
        rt.close()
    return 0


def _check_port(host: str, port: int) -> None:
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise UserError(f"--host {host}: not an address of this machine") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as exc:
            raise UserError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port") from None


if __name__ == "__main__":
    sys.exit(main())
