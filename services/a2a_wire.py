"""a2a-sdk's generated A2A protobuf modules, made picklable for Serve, and the servicer registration.

a2a-sdk 1.3.0 generates `a2a.types.a2a_pb2` with its classes' `__module__` set to plain `a2a_pb2`,
so pickle (which Serve uses to carry each request from the gRPC proxy to a replica and the reply
back) cannot find them by name. Importing this module makes `a2a_pb2` an alias of the real module;
both ends import it: the proxy through the registration function below (what the Serve configs list
in `grpc_servicer_functions`), the replicas through `services.a2a` (the agent) and
`services.bridge_service` (whose refusals of the A2A RPCs, `services.auth.refusals`, are generated
from `SERVICE`). Kept free of torch and of the agent so the proxy process imports only this.
"""

from __future__ import annotations

import sys

from a2a.types import a2a_pb2, a2a_pb2_grpc

sys.modules.setdefault("a2a_pb2", a2a_pb2)

SERVICE = a2a_pb2.DESCRIPTOR.services_by_name["A2AService"]  # lf.a2a.v1.A2AService: its RPCs, their types


def add_A2AServiceServicer_to_server(servicer, server) -> None:  # noqa: N802 - the name gRPC's generator gives it
    """`a2a_pb2_grpc.add_A2AServiceServicer_to_server`, with the alias above in place."""
    a2a_pb2_grpc.add_A2AServiceServicer_to_server(servicer, server)
