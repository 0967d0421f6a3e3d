"""What the A2A front door costs over `Ask`: the same LATENT requests, alternated, on one served stack.

    .venv/bin/python results/bench/a2a_overhead.py [--requests 16] [--context-tokens 1024]

Starts deploy/local.yaml (the embedded pair) on a local Ray cluster and sends each bench item once as
`AgentService.Ask` and once as A2A `SendMessage` (a2a-sdk's own gRPC transport, one channel reused),
alternating which goes first, after a warm-up of both. Prints and writes
results/bench/a2a_overhead.json: end-to-end p50 of each and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

import grpc  # noqa: E402
from a2a.client.client import ClientCallContext  # noqa: E402
from a2a.client.transports.grpc import GrpcTransport  # noqa: E402
from a2a.types import a2a_pb2 as a2a  # noqa: E402

from services import bench, local  # noqa: E402
from services.client import LatentWireClient  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--context-tokens", type=int, default=1024)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--json", default=str(Path(__file__).parent / "a2a_overhead.json"))
    a = ap.parse_args()
    items = bench.bench_items(a.requests + 1, a.context_tokens, seed=7)
    cfg = local.load_config()
    local.deploy(cfg, address="local", ray_init={"log_to_driver": False})
    address = local.grpc_address(cfg)
    ask_ms, a2a_ms, same = [], [], 0

    async def run():
        nonlocal same
        transport = GrpcTransport(grpc.aio.insecure_channel(address), None)
        ctx = ClientCallContext(service_parameters={"application": "source"}, timeout=300)

        async def send(context: str, question: str) -> tuple[float, str]:
            msg = a2a.Message(message_id=secrets.token_hex(8), role=a2a.ROLE_USER,
                              parts=[a2a.Part(text=question), a2a.Part(text=context)])
            msg.metadata.update({"mode": "latent", "max_new_tokens": a.max_new_tokens})
            t0 = time.perf_counter()
            reply = await transport.send_message(a2a.SendMessageRequest(message=msg), context=ctx)
            return (time.perf_counter() - t0) * 1000, reply.task.artifacts[0].parts[0].text

        with LatentWireClient(address, timeout_s=300) as client:
            def ask(context: str, question: str) -> tuple[float, str]:
                t0 = time.perf_counter()
                r = client.ask(context, question, "latent", max_new_tokens=a.max_new_tokens)
                return (time.perf_counter() - t0) * 1000, r.answer

            ask(items[0].context, items[0].question)  # warm-up, discarded
            await send(items[0].context, items[0].question)
            for i, it in enumerate(items[1:]):
                order = [0, 1] if i % 2 == 0 else [1, 0]
                got = {}
                for k in order:
                    got[k] = ask(it.context, it.question) if k == 0 else await send(it.context, it.question)
                ask_ms.append(got[0][0])
                a2a_ms.append(got[1][0])
                same += got[0][1] == got[1][1]
        await transport.close()

    try:
        asyncio.run(run())
    finally:
        local.shutdown()
    out = {"requests": a.requests, "context_tokens": a.context_tokens, "mode": "latent",
           "ask_p50_ms": statistics.median(ask_ms), "a2a_p50_ms": statistics.median(a2a_ms),
           "a2a_over_ask_p50": statistics.median(a2a_ms) / statistics.median(ask_ms),
           "same_answers": same, "ask_ms": ask_ms, "a2a_ms": a2a_ms, "hardware": bench.hardware()}
    Path(a.json).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if not k.endswith("_ms") or "p50" in k}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
