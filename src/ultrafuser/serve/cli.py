"""`ultrafuser serve MODEL_DIR`: an OpenAI-compatible HTTP server (uvicorn) over a fused model.

SIGTERM / SIGINT drain gracefully: the app refuses new requests (503), uvicorn stops accepting connections,
in-flight requests (streams included) finish, the engine thread stops, and the process exits 0.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path

from ultrafuser.serve import protocol as P


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a fused model over an OpenAI-compatible HTTP API (+ a chat page at /)")
    p.add_argument("model_dir", help="a fused-model directory (from `ultrafuser fuse` or training)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port, printed at start)")
    p.add_argument("--api-key-env", metavar="VAR",
                   help="require `Authorization: Bearer KEY` where KEY is the value of environment variable VAR "
                        "(every route but /health and the page at /); the key is never logged")
    p.add_argument("--served-model-name", help="the model id clients send (default: the directory's name)")
    p.add_argument("--device", help="move every specialist to this device (e.g. cuda)")
    p.add_argument("--threads", type=int, help="torch threads for the engine (default: torch's)")
    p.add_argument("--max-batch", type=int, default=P.DEFAULT_MAX_BATCH, help="rows decoded together")
    p.add_argument("--max-queue", type=int, default=P.DEFAULT_MAX_QUEUE,
                   help="requests waiting for a batch; more get 429")
    p.add_argument("--max-tokens", type=int, help="most tokens one request may generate (default: the context length)")
    p.add_argument("--context-length", type=int, help="lower the model's context length (default: the smallest "
                                                      "specialist's)")
    p.add_argument("--max-n", type=int, help=f"most choices (prompts x n) per request (default {P.DEFAULT_MAX_N}, "
                                              "or --max-batch if smaller)")
    p.add_argument("--max-stop", type=int, default=P.DEFAULT_MAX_STOP, help="most stop strings per request")
    p.add_argument("--max-stop-chars", type=int, default=P.DEFAULT_MAX_STOP_CHARS, help="longest stop string")
    p.add_argument("--max-messages", type=int, default=P.DEFAULT_MAX_MESSAGES, help="most messages per chat request")
    p.add_argument("--max-body-bytes", type=int, default=P.DEFAULT_MAX_BODY_BYTES, help="largest request body")
    p.add_argument("--max-json-depth", type=int, default=P.DEFAULT_MAX_JSON_DEPTH, help="deepest JSON nesting")
    p.add_argument("--body-timeout", type=float, default=P.BODY_READ_TIMEOUT_S,
                   help="seconds a client may take to send its request body (then 408)")
    p.add_argument("--graceful-timeout", type=float, default=60.0,
                   help="seconds in-flight requests get to finish after SIGTERM (default 60)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run)


def limits_from_args(args) -> P.Limits:
    return P.Limits(max_batch=args.max_batch, max_queue=args.max_queue, max_tokens=args.max_tokens,
                    max_n=args.max_n, max_stop=args.max_stop, max_stop_chars=args.max_stop_chars,
                    max_messages=args.max_messages, max_body_bytes=args.max_body_bytes,
                    max_json_depth=args.max_json_depth, context_length=args.context_length,
                    body_read_timeout_s=args.body_timeout)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def run(args) -> int:
    import uvicorn

    from ultrafuser.config import ConfigError
    from ultrafuser.modeling.cli import _quiet_transformers
    from ultrafuser.modeling.fused import FusedModel
    from ultrafuser.serve.app import create_app

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise ConfigError(f"--api-key-env {args.api_key_env}: that environment variable is unset or empty; "
                              "export it with the key clients must send")
    limits = limits_from_args(args)
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads {args.threads} must be at least 1")
    _quiet_transformers()
    model = FusedModel.from_pretrained(args.model_dir)
    if args.device:
        model.to(args.device)
    name = args.served_model_name or Path(args.model_dir).resolve().name
    app = create_app(model, model_name=name, limits=limits, api_key=api_key, threads=args.threads)
    engine = app.state.engine

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            engine.begin_drain()  # new requests get 503 from now on; in-flight ones finish
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=args.graceful_timeout,
                            lifespan="on", server_header=False)
    server = Server(config)
    try:
        sock = _bind(args.host, args.port)
    except OSError as e:
        raise ConfigError(f"cannot listen on {args.host}:{args.port}: {e}") from None
    host, port = sock.getsockname()[:2]
    print(f"ultrafuser serve: http://{host}:{port} (model {name!r}: {', '.join(model.domains)}; "
          f"context {engine.context_length}; API key {'required' if api_key else 'off'})", file=sys.stderr, flush=True)
    # uvicorn re-raises the signal that stopped it after a graceful shutdown; with this handler in place the
    # re-raised SIGTERM is a no-op, so a drained server exits 0 (SIGINT still ends in KeyboardInterrupt -> 130).
    signal.signal(signal.SIGTERM, lambda *a: None)
    server.run(sockets=[sock])
    return 0 if server.started else 1
