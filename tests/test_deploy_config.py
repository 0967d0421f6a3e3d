"""Every Serve config in deploy/ validates against Serve's schema and our settings models."""

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from services import local

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "deploy").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_serve_configs_validate(path):
    cfg = next(yaml.safe_load_all(path.read_text()))  # Kubernetes manifests may hold several documents
    if "applications" not in cfg:
        pytest.skip("not a Serve config")
    schema = local.validate(cfg)
    assert {a.name for a in schema.applications} >= {"source", "target", "bridge"}


def test_local_config_registers_the_grpc_and_health_servicers():
    opts = local.load_config(local.DEFAULT_CONFIG)["grpc_options"]["grpc_servicer_functions"]
    assert any(f.endswith("add_AgentServiceServicer_to_server") for f in opts)
    assert any(f.endswith("add_BridgeServiceServicer_to_server") for f in opts)
    assert "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server" in opts


def test_a_typo_in_app_args_is_an_error():
    cfg = local.load_config(local.DEFAULT_CONFIG)
    cfg["applications"][0]["args"]["mesage_tokens"] = 32
    with pytest.raises(ValidationError, match="mesage_tokens"):
        local.validate(cfg)


@pytest.mark.parametrize("app,key,value", [("bridge", "search_dtype", "float16"),
                                            ("target", "max_batch_tokens", 0),
                                            ("target", "prefill_dtype", "float16")])
def test_a_bad_hot_path_setting_is_an_error(app, key, value):
    cfg = local.load_config(local.DEFAULT_CONFIG)
    next(a for a in cfg["applications"] if a["name"] == app)["args"][key] = value
    with pytest.raises(ValidationError, match=key):
        local.validate(cfg)


@pytest.mark.parametrize("name", ["local.yaml", "local-fmkvc.yaml"])
def test_local_source_reads_the_layer_the_packaged_bridge_was_trained_on(name):
    import json

    from bridge.load import default_weights_path

    bridge = json.loads(default_weights_path().with_suffix(".json").read_text())["config"]
    cfg = local.load_config(local.DEFAULT_CONFIG.parent / name)
    source = next(a for a in cfg["applications"] if a["name"] == "source")["args"]
    assert source["profile"] == bridge["source_model"]
    assert source["source_layer"] == bridge["source_layer"]


@pytest.mark.parametrize("args, field", [
    (dict(source_layer=12), "source_layer=12"),
    (dict(targets={"default": {"source_layer": 9}}), "targets.default.source_layer=9"),
])
def test_agent_refuses_a_source_layer_its_model_lacks(args, field):
    """A layer out of range would fail every latent request at run time; the replica refuses to start."""
    from services.agent import AgentServicer

    with pytest.raises(ValueError, match=field):
        AgentServicer(dict(profile="tiny-llama", threads=1, **args))


def test_agent_prefills_in_the_dtype_its_settings_name():
    """prefill_dtype reaches the replica's model: bfloat16 makes the decoder copy, float32 none."""
    import torch

    from services.agent import AgentServicer

    fast = AgentServicer(dict(profile="tiny-mistral", threads=1, prefill_dtype="bfloat16")).model
    plain = AgentServicer(dict(profile="tiny-mistral", threads=1, prefill_dtype="float32")).model
    assert fast.prefill_dtype == torch.bfloat16 and fast.engine.prefill_model is not None
    assert plain.prefill_dtype == torch.float32 and plain.engine.prefill_model is None
    with pytest.raises(ValueError, match="dense cache"):  # a compressed cache keeps float32 keys
        AgentServicer(dict(profile="tiny-mistral", threads=1, prefill_dtype="bfloat16",
                           kv_compression={"method": "mean_pool", "window": 4, "sink": 2, "recent": 8}))


def test_an_agent_refuses_a_window_its_sidecar_cannot_compress(tmp_path):
    """A sidecar has position embeddings for max_window tokens: a larger window would fail at the
    first full window of a request; the replica refuses its settings at start instead."""
    from compression.sidecar import Sidecar, SidecarConfig
    from services.agent import AgentServicer

    path = tmp_path / "sc.safetensors"
    Sidecar(SidecarConfig(model="tiny-mistral", head_dim=16, n_layers=2, n_kv_heads=2, d_model=16, n_heads=2,
                          windows=[4], max_window=8)).save(path)
    compress = {"method": "fmkvc", "weights": str(path), "sink": 2, "recent": 8}
    assert AgentServicer(dict(profile="tiny-mistral", threads=1, kv_compression={**compress, "window": 8})).model
    with pytest.raises(ValueError, match="up to 8 tokens, not 16"):
        AgentServicer(dict(profile="tiny-mistral", threads=1, kv_compression={**compress, "window": 16}))
