"""The committed generated modules are exactly what protoc makes from the .proto files."""

from protos.generate import ROOT, generate


def test_generated_modules_are_current(tmp_path):
    fresh = generate(tmp_path)
    assert {p.name for p in fresh} == {"latentwire_pb2.py", "latentwire_pb2.pyi", "latentwire_pb2_grpc.py"}
    for p in fresh:
        committed = ROOT / p.relative_to(tmp_path)
        assert committed.read_text() == p.read_text(), f"{committed} is stale: run `make protos`"


def test_services_and_rpcs_are_declared():
    from protos.latentwire.v1 import latentwire_pb2 as pb

    agent = pb.DESCRIPTOR.services_by_name["AgentService"]
    assert {m.name for m in agent.methods} >= {"Ask", "AskStream", "Receive"}
    assert agent.methods_by_name["AskStream"].server_streaming
    assert [m.name for m in pb.DESCRIPTOR.services_by_name["BridgeService"].methods] == ["Translate"]
    assert set(pb.Mode.keys()) == {"LATENT", "TEXT", "EXTRACT", "DIRECT", "NONE"}


def test_cli_lists_the_commands_of_every_area():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "latentwire.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for cmd in ["serve", "ask", "demo", "bench", "bridge", "models"]:
        assert cmd in out
