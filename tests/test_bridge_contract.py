"""The bridge contract (bridge/base.py): every registered kind keeps it, `load_bridge` picks the class
the manifest names, capabilities answer by method, and `train bridge` refuses flags its --arch lacks."""

import dataclasses
import importlib
import json

import pytest
import torch

from bridge.aligned import AlignedBridge, AlignedConfig, vocab_digest
from bridge.base import BridgeBase
from bridge.load import BRIDGES, load_bridge
from bridge.perceiver import PerceiverBridge, PerceiverConfig


def _perceiver():
    return PerceiverBridge(PerceiverConfig("a", "b", 2, d_src=16, d_tgt=24, num_queries=3, d_model=32)).eval()


def _aligned(vocab):
    cfg = AlignedConfig("a", "b", 2, 16, vocab.shape[1], vocab_digest=vocab_digest(vocab))
    return AlignedBridge(cfg, torch.arange(len(vocab)), vocab).eval()


@pytest.mark.parametrize("arch", BRIDGES.names())
def test_every_registered_kind_keeps_the_contract(arch):
    cls = BRIDGES.get(arch)
    assert issubclass(cls, BridgeBase)
    # the manifest's arch is the registry's name: a saved config loads back through the registry
    assert {f.name: f.default for f in dataclasses.fields(cls.config_class)}["arch"] == arch
    from latentwire.jobs import TRAIN_JOBS

    importlib.import_module(cls.train_job.module)
    job = TRAIN_JOBS.get(cls.train_job.name)
    assert dataclasses.is_dataclass(job.config) and callable(job.run)


def test_the_registry_has_both_kinds():
    assert BRIDGES.names() == ["aligned", "perceiver"]
    assert BRIDGES.get("perceiver") is PerceiverBridge and BRIDGES.get("aligned") is AlignedBridge


def test_soft_tokens_per_packet_and_capabilities():
    torch.manual_seed(0)
    p, a = _perceiver(), _aligned(torch.randn(10, 24))
    with torch.no_grad():
        for rows in (1, 7):
            h = torch.randn(1, rows, 16)
            assert p(h).shape[1] == p.num_soft_tokens(rows) == 3
            assert a(h).shape[1] == a.num_soft_tokens(rows) == rows
    assert a.supports_token_index() and not p.supports_token_index()
    with pytest.raises(TypeError, match="no vocabulary search"):
        p.use_token_index(torch.tensor([0, 1]), torch.tensor([0]))


def test_load_bridge_picks_the_class_the_manifest_names(tmp_path):
    path = tmp_path / "p.safetensors"
    b = _perceiver()
    man = b.save(path)
    assert json.loads(path.with_suffix(".json").read_text())["config"]["arch"] == "perceiver"
    loaded = load_bridge(path, token_index="auto")  # a Perceiver has no index to look for
    assert type(loaded) is PerceiverBridge and loaded.sha256 == man["sha256"]
    with pytest.raises(ValueError, match="does not take one"):
        load_bridge(path, token_index=str(tmp_path / "p.index.safetensors"))
    # a file written before manifests named the arch is a Perceiver
    meta = json.loads(path.with_suffix(".json").read_text())
    del meta["config"]["arch"]
    path.with_suffix(".json").write_text(json.dumps(meta))
    assert type(load_bridge(path)) is PerceiverBridge
    meta["config"]["arch"] = "hexagonal"
    path.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(KeyError, match="unknown bridge architecture 'hexagonal'; known: aligned, perceiver"):
        load_bridge(path)


@pytest.mark.parametrize("arch, flag", [("aligned", "--steps"), ("aligned", "--num-queries"),
                                        ("perceiver", "--ridge")])
def test_train_bridge_refuses_a_flag_its_arch_does_not_take(arch, flag):
    from latentwire.cli import build_parser

    args = build_parser().parse_args(["train", "bridge", "--arch", arch, flag, "8"])
    from latentwire.errors import ConfigError

    with pytest.raises(ConfigError, match=f"--arch {arch} takes no {flag}"):
        args.func(args)


def test_train_bridge_arch_choices_come_from_the_registry(capsys):
    from latentwire.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "bridge", "--arch", "hexagonal"])
    assert "choose from 'aligned', 'perceiver'" in capsys.readouterr().err
