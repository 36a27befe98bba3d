"""`radixserve <command>`: the flags of every command are generated from ServerArgs."""
from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import types
import typing

from radixserve.bench.run import add_bench_args, bench as run_bench
from radixserve.config import ServerArgs
from radixserve.lora.refs import LoRANotFoundError
from radixserve.managers.launch import EngineStartError


def _field_type(f: dataclasses.Field) -> type:
    hint = typing.get_type_hints(ServerArgs)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return args[0]
    return hint


def add_server_args(parser: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(ServerArgs):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        kind = _field_type(f)
        if kind is bool:
            parser.add_argument(flag, action="store_true", help=help_text)
            continue
        if typing.get_origin(kind) is list:  # e.g. --matryoshka-dimensions 128 256
            parser.add_argument(flag, type=typing.get_args(kind)[0], nargs="+", default=f.default, help=help_text)
            continue
        parser.add_argument(flag, type=kind, default=f.default, choices=f.metadata.get("choices"), help=help_text)


def server_args_from(ns: argparse.Namespace) -> ServerArgs:
    names = {f.name for f in dataclasses.fields(ServerArgs)}
    return ServerArgs(**{k: v for k, v in vars(ns).items() if k in names})


def _generate(ns: argparse.Namespace) -> None:
    from radixserve.entrypoints.engine import Engine

    params = {"max_new_tokens": ns.max_new_tokens, "temperature": ns.temperature}
    args = server_args_from(ns)
    with Engine(**dataclasses.asdict(args)) as engine:
        out = engine.generate(ns.prompt, params, lora_path=ns.lora_path)
    print(json.dumps(out, indent=2) if ns.json else out["text"])


def _serve(ns: argparse.Namespace) -> None:
    import logging

    import uvicorn

    from radixserve.server.app import create_app

    args = server_args_from(ns)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # uvicorn re-raises the signal it handled once it has shut down; a graceful stop is a success.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    fatal: list[str] = []

    def give_up(reason: str) -> None:
        # The engine cannot start, or keeps dying: exit non-zero, so that a process supervisor (systemd,
        # Kubernetes) sees a failure instead of a server that answers 503 forever.
        fatal.append(reason)
        server.should_exit = True

    # uvicorn stops accepting on SIGTERM/SIGINT (or give_up), lets in-flight requests finish, then the
    # app's lifespan stops the engine process.
    server = uvicorn.Server(uvicorn.Config(create_app(args, on_fatal=give_up), host=args.host, port=args.port,
                                           log_level=args.log_level, timeout_graceful_shutdown=30,
                                           access_log=False))  # --log-requests logs richer lines
    server.run()
    if fatal:
        sys.exit(f"error: {fatal[0]}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="radixserve", description="A fast LLM serving engine.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the OpenAI-compatible HTTP API",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_server_args(serve)
    serve.set_defaults(func=_serve)

    bench = commands.add_parser("bench", help="benchmark one or more OpenAI-compatible servers",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_bench_args(bench)
    bench.set_defaults(func=run_bench)

    gen = commands.add_parser("generate", help="generate a completion for one prompt offline",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    gen.add_argument("prompt")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--json", action="store_true", help="print the whole result with its meta_info")
    gen.add_argument("--lora-path", default=None, help="the LoRA adapter to use: a --lora-paths name or a folder")
    add_server_args(gen)
    gen.set_defaults(func=_generate)

    ns = parser.parse_args(argv)
    try:
        ns.func(ns)
    except (ValueError, FileNotFoundError, LoRANotFoundError, EngineStartError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
