"""`latentwire serve`, `latentwire ask`, `latentwire demo`."""

from __future__ import annotations

import argparse
import json
import sys
import time


def _quiet() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _serve(args: argparse.Namespace) -> int:
    from services import local

    config = local.load_config(args.config or local.DEFAULT_CONFIG)
    local.deploy(config, address=args.ray_address)
    print(f"LatentWire serving {[a['name'] for a in config['applications']]} on gRPC "
          f"{local.grpc_address(config)}; Ctrl-C stops.", flush=True)
    import signal

    def stop(signum, frame):
        raise KeyboardInterrupt

    # explicit handlers: a background shell starts us with SIGINT ignored, and SIGTERM should stop cleanly too
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("shutting down", flush=True)
    finally:
        local.shutdown()
    return 0


def _ask(args: argparse.Namespace) -> int:
    import grpc

    from services.client import LatentWireClient
    from services.report import reply_dict, table

    ca = open(args.ca_cert, "rb").read() if args.ca_cert else None
    with LatentWireClient(args.address, source_app=args.app, token=args.token, tls=args.tls or bool(ca),
                          root_certificates=ca) as client:
        kw = dict(max_new_tokens=args.max_new_tokens, target_agent=args.target_agent, request_id=args.request_id,
                  message_tokens=args.message_tokens)
        t0 = time.perf_counter()
        try:
            if args.stream and not args.json:
                reply = None
                for chunk in client.ask_stream(args.context, args.question, args.mode, **kw):
                    if chunk.HasField("reply"):
                        reply = chunk.reply
                    else:
                        print(chunk.text, end="", flush=True)
                print()
            else:
                reply = client.ask(args.context, args.question, args.mode, **kw)
        except grpc.RpcError as err:
            print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
        ms = (time.perf_counter() - t0) * 1000
    if args.json:
        print(json.dumps(reply_dict(reply, ms), indent=2))
    else:
        if not args.stream:
            print(reply.answer)
        if args.timings:
            print(table([("ask", reply, ms)]))
    return 0


def _demo(args: argparse.Namespace) -> int:
    _quiet()
    from services import local
    from services.demo import run_demo

    results = run_demo(local.load_config(args.config or local.DEFAULT_CONFIG), max_new_tokens=args.max_new_tokens)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.json}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    _quiet()
    from services import bench, local

    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    address, started = args.address, False
    if args.start_local:
        config = local.load_config(args.config or local.DEFAULT_CONFIG)
        local.deploy(config, address="local", ray_init={"log_to_driver": False})
        address, started = local.grpc_address(config), True
    try:
        report = bench.run_bench(address, requests=args.requests, concurrency=ints(args.concurrency),
                                 context_tokens=ints(args.context_tokens), modes=args.modes.split(","),
                                 targets=[t if t != "default" else "" for t in args.targets.split(",")],
                                 max_new_tokens=args.max_new_tokens, message_tokens=args.message_tokens,
                                 warmup=args.warmup, repeats=args.repeats, session_turns=args.session_turns,
                                 session_mode=args.session_mode)
    finally:
        if started:
            local.shutdown()
    bench.write(report, args.json, args.plot)
    print(bench.table(report))
    print(json.dumps({"hardware": report["hardware"], "throughput_scaling": report["throughput_scaling"],
                      "sessions": [{k: v for k, v in s.items() if k != "records"} for s in report["sessions"]]},
                     default=float))
    return 0


def register(sub, group) -> None:
    from services.packets import MODES

    p = sub.add_parser("serve", help="start the Serve applications of a config and serve until Ctrl-C")
    p.add_argument("--config", default=None, help="Serve config YAML (default: deploy/local.yaml)")
    p.add_argument("--ray-address", default=None, help="existing Ray cluster (default: start a local one)")
    p.set_defaults(func=_serve)

    p = sub.add_parser("ask", help="send one agent-to-agent request over gRPC")
    p.add_argument("--mode", choices=sorted(MODES), default="latent")
    p.add_argument("--context", default="")
    p.add_argument("--question", required=True)
    p.add_argument("--address", default="127.0.0.1:9000", help="gRPC ingress HOST:PORT")
    p.add_argument("--app", default="source", help="Serve application of the source agent")
    p.add_argument("--target-agent", default="", help="named target agent (default: the source's default)")
    p.add_argument("--max-new-tokens", type=int, default=0, help="0: the server default")
    p.add_argument("--message-tokens", type=int, default=0,
                   help="the message budget M of TEXT, EXTRACT and LATENT (0: the server's setting)")
    p.add_argument("--request-id", default="", help="idempotency key (a retry returns the same reply)")
    p.add_argument("--token", default=None, help="bearer token, when the ingress requires one "
                   "(default: $LATENTWIRE_AUTH_TOKEN)")
    p.add_argument("--tls", action="store_true", help="TLS to a TLS-terminating ingress in front of the proxy")
    p.add_argument("--ca-cert", default=None, help="PEM root certificates for --tls (default: the system's)")
    p.add_argument("--stream", action="store_true", help="stream the answer token by token (AskStream)")
    p.add_argument("--timings", action="store_true", help="print the per-stage latency table")
    p.add_argument("--json", action="store_true", help="print the reply as JSON (answer, timings, bytes)")
    p.set_defaults(func=_ask)

    p = sub.add_parser("demo", help="local cluster, embedded pair, a few requests in every mode, then stop")
    p.add_argument("--config", default=None, help="Serve config YAML (default: deploy/local.yaml)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--json", default=None, help="also write the replies to this JSON file")
    p.set_defaults(func=_demo)

    p = sub.add_parser("bench", help="LATENT vs TEXT latency through the real gRPC stack; JSON + PNG")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--address", default="127.0.0.1:9000", help="gRPC ingress of a running deployment")
    where.add_argument("--start-local", action="store_true", help="start --config on a local cluster, stop after")
    p.add_argument("--config", default=None, help="Serve config for --start-local (default: deploy/local.yaml)")
    p.add_argument("--requests", type=int, default=12,
                   help="items per setting (each sent in every mode); 0: no request workload (sessions only)")
    p.add_argument("--concurrency", default="1,4,16",
                   help="requests in flight; with --session-turns, also the sessions run at once per target")
    p.add_argument("--context-tokens", default="256")
    p.add_argument("--message-tokens", type=int, default=64,
                   help="the message budget M of TEXT, EXTRACT and LATENT")
    p.add_argument("--max-new-tokens", type=int, default=8, help="answer length cap")
    p.add_argument("--modes", default="latent,text,extract,direct", help="any of latent,text,extract,direct,none")
    p.add_argument("--targets", default="default", help="target agents, e.g. default,fmkvc (FMKVC off/on)")
    p.add_argument("--session-turns", type=int, default=0,
                   help="the session workload: sessions of N turns (each a new fact and its question) against "
                        "every target at once, per concurrency and context size; 0: off")
    p.add_argument("--session-mode", choices=sorted(MODES), default="latent", help="the mode of every session turn")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="rounds the items are split into for the spread")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    p.set_defaults(func=_bench)
