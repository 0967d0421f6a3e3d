"""Multi-node placement on one machine: ray.cluster_utils.Cluster with a CPU head and three GPU nodes.

The nodes declare what the cluster launcher's node types declare (logical GPUs and the custom
resources `latentwire_llm` / `latentwire_bridge`); the Serve config is deploy/cluster-gpu.yaml with
only the models swapped for the tiny twins (CPU compute) and one replica each, so its placement
spec (num_gpus, custom resources) is what decides where each replica lands. Ray's state API then
says where they are, and a request crosses the nodes over gRPC.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import grpc
import pytest

from tests.conftest import free_port
from tests.test_auth import AuthOverGrpc
from tests.serve_cluster import TINY_BRIDGE_ID, replicas, state_address, tiny_config

TOKEN = secrets.token_hex(16)
INTERNAL = secrets.token_hex(16)
NODES = {  # name -> ray start resources, as in deploy/cluster-launcher.yaml's node types
    "llm-a": dict(num_cpus=1, num_gpus=1, resources={"latentwire_llm": 1}),
    "llm-b": dict(num_cpus=1, num_gpus=1, resources={"latentwire_llm": 1}),
    "bridge": dict(num_cpus=1, num_gpus=1, resources={"latentwire_bridge": 4}),
}


def cluster_config(bridge_path, grpc_port: int, http_port: int) -> dict:
    from services import local

    cfg = tiny_config(bridge_path, grpc_port, http_port, token=TOKEN, internal_token=INTERNAL,
                      base=local.load_config(local.ROOT / "deploy" / "cluster-gpu.yaml"))
    cfg["proxy_location"] = "HeadOnly"  # one machine: proxies on every node would share one port
    cfg["http_options"]["host"] = "127.0.0.1"
    for app in cfg["applications"]:
        app["args"].update(device="cpu", threads=1)
        app["args"].pop("dtype", None)
        dep = app["deployments"][0]
        dep.pop("autoscaling_config")
        dep["num_replicas"] = 1
        # placement is the production spec: keep num_gpus and custom resources, shrink the CPUs
        dep["ray_actor_options"] = {**dep["ray_actor_options"], "num_cpus": 0.25}
    source = next(a for a in cfg["applications"] if a["name"] == "source")
    source["args"].update(source_layer=2, hop_timeout_s=60)
    return cfg


@pytest.fixture(scope="module")
def cluster(tiny_bridge_path):
    import ray
    from ray.cluster_utils import Cluster

    from services import local

    mb = 1024**2
    # Cluster publishes its address in /tmp/ray/ray_current_cluster, where any `ray.init()` without an
    # address on this machine (another engineer's `latentwire serve`) would attach to it and deploy
    # its own config over ours: put the file back as it was at once.
    address_file = Path(ray._private.utils.get_ray_address_file(None))
    previous = address_file.read_text() if address_file.exists() else None
    try:
        c = Cluster(initialize_head=True, head_node_args=dict(
            num_cpus=1, num_gpus=0, object_store_memory=100 * mb, include_dashboard=True,
            dashboard_port=free_port()))
    finally:
        address_file.write_text(previous) if previous is not None else address_file.unlink(missing_ok=True)
    nodes = {name: c.add_node(object_store_memory=80 * mb, **spec) for name, spec in NODES.items()}
    c.wait_for_nodes()
    ray.init(address=c.address, namespace="serve", log_to_driver=False)
    cfg = cluster_config(tiny_bridge_path, free_port(), free_port())
    try:
        local.deploy(cfg, timeout_s=300)
        yield dict(address=local.grpc_address(cfg), config=cfg, head=c.head_node.node_id,
                   nodes={name: n.node_id for name, n in nodes.items()})
    finally:
        local.shutdown()
        c.shutdown()


def test_the_cluster_has_a_cpu_head_and_three_gpu_nodes(cluster):
    from ray.util.state import list_nodes

    alive = {n.node_id: n for n in list_nodes(address=state_address()) if n.state == "ALIVE"}
    assert len(alive) == 4
    assert alive[cluster["head"]].resources_total.get("GPU", 0) == 0
    assert sum(n.resources_total.get("GPU", 0) for n in alive.values()) == 3


def test_replicas_land_where_the_config_places_them(cluster):
    names = {v: k for k, v in cluster["nodes"].items()} | {cluster["head"]: "head"}
    where = {a.class_name.split(":")[1]: names.get(a.node_id, a.node_id) for a in replicas()}
    nodes = dict(zip(cluster["nodes"], cluster["nodes"]))
    assert set(where) == {"source", "target", "bridge"}
    # each model replica has a whole GPU of an `latentwire_llm` node, so they cannot share one
    assert {where["source"], where["target"]} == {nodes["llm-a"], nodes["llm-b"]}
    assert where["bridge"] == nodes["bridge"]  # the only node declaring latentwire_bridge
    assert cluster["head"] not in where.values()  # the head has no GPU: only Serve's controller and proxy


def test_actors_hold_the_gpu_share_the_config_asks_for(cluster):
    from ray.util.state import list_actors

    demand = {a["name"]: a["deployments"][0]["ray_actor_options"]["num_gpus"] for a in cluster["config"]["applications"]}
    actors = list_actors(address=state_address(), filters=[("state", "=", "ALIVE")], detail=True)
    held = {a.class_name.split(":")[1]: a.required_resources.get("GPU", 0)
            for a in actors if a.class_name.startswith("ServeReplica:")}
    assert held == demand == {"source": 1, "target": 1, "bridge": 0.25}


def test_a_latent_request_crosses_the_nodes_over_grpc(cluster):
    from services.client import LatentWireClient

    with LatentWireClient(cluster["address"], token=TOKEN, timeout_s=60) as c:
        reply = c.ask("Alice keeps the red key in Lisbon.", "Where is the key?", "latent", max_new_tokens=4)
    # client -> proxy (head) -> source (llm node) -> proxy -> bridge (bridge node) -> target (other llm node)
    assert reply.answer_tokens > 0 and reply.target_model == "tiny-mistral" and reply.message_tokens == 4
    assert reply.timings.bridge_ms > 0 and reply.timings.target_prefill_ms > 0
    assert reply.packet_bytes > 0


def test_the_cluster_config_keeps_auth_on(cluster):
    from services.client import NO_RETRY, LatentWireClient

    with LatentWireClient(cluster["address"], token="", timeout_s=30, retry=NO_RETRY) as c:
        with pytest.raises(grpc.RpcError) as err:
            c.ask("x", "Where is the key?", "none")
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert TINY_BRIDGE_ID in cluster["config"]["applications"][1]["args"]["accepted_bridges"]


# ---- auth, on by default in the cluster config: the tests of tests/test_auth.py over real gRPC -----
@pytest.fixture()
def grpc_address(cluster):
    return cluster["address"]


@pytest.fixture()
def auth_token():
    return TOKEN


@pytest.fixture()
def internal_token():
    return INTERNAL


class TestAuthOnTheClusterConfig(AuthOverGrpc):
    pass
