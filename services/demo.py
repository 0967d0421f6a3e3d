"""`latentwire demo`: the embedded pair on a local Ray cluster, every mode, over real gRPC."""

from __future__ import annotations

import time

from services import packets

DEMO_ITEMS = [
    ("The courier for the northern route is Helena Varga. She leaves from Lisbon every Tuesday.",
     "Who is the courier for the northern route?", "Helena Varga"),
    ("Order 4471 was shipped on 12 March. It contained 36 blue ceramic tiles for the museum in Oslo.",
     "How many tiles did order 4471 contain?", "36"),
    ("The meeting about the bridge repair moved to Friday. It will be held in room Amber on floor 9.",
     "In which room will the meeting be held?", "Amber"),
]
MODES = list(packets.MODES)


def run_demo(config: dict, *, max_new_tokens: int = 16, warmup: bool = True, ray_logs: bool = False) -> list[dict]:
    from services import local
    from services.client import LatentWireClient
    from services.report import reply_dict, table

    t0 = time.perf_counter()
    # replica logs stay in Ray's log folder (/tmp/ray/session_latest/logs) unless asked for
    local.deploy(config, address="local", ray_init={"log_to_driver": ray_logs})  # always a fresh local cluster
    address = local.grpc_address(config)
    print(f"\n== 3 Serve applications RUNNING in {time.perf_counter() - t0:.1f} s; gRPC ingress {address}", flush=True)
    results, rows = [], []
    try:
        with LatentWireClient(address) as client:
            print("health:", {app: client.health(app) for app in ("source", "target", "bridge")}, flush=True)
            if warmup:  # first calls pay lazy initialisation (prefix embeddings, channels)
                for mode in MODES:
                    client.ask(DEMO_ITEMS[0][0], DEMO_ITEMS[0][1], mode, max_new_tokens=2)
            for i, (context, question, expected) in enumerate(DEMO_ITEMS):
                for mode in MODES:
                    t = time.perf_counter()
                    reply = client.ask(context, question, mode, max_new_tokens=max_new_tokens)
                    ms = (time.perf_counter() - t) * 1000
                    rows.append((f"q{i + 1}", reply, ms))
                    results.append({**reply_dict(reply, ms), "question": question, "expected": expected})
        print(f"\nQuestions (expected answer):")
        for i, (_, q, a) in enumerate(DEMO_ITEMS):
            print(f"  q{i + 1}: {q}  ({a})")
        print("\nPer-stage latency, ms (hops are gRPC round trips minus the callee's own time):")
        print(table(rows), flush=True)
    finally:
        local.shutdown()
    return results
