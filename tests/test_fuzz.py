"""Property-based fuzz (hypothesis) over the real gRPC API of a real local cluster (tiny pair).

Random shapes, dtypes, byte lengths, NaN/Inf, huge dimensions, wrong provenance and random strings
for Ask, AskStream, Receive and Translate (auth on: a few examples carry a random authorization
value instead of the token). Every call must end in a deliberate status, never INTERNAL or UNKNOWN;
afterwards the replicas are the same actors with the same pids (no restart) and a good request
succeeds. Examples: the `ci` profile runs 300; LATENTWIRE_FUZZ_EXAMPLES=1000 runs more.
"""

from __future__ import annotations

import collections
import json
import math
import os
import secrets
import struct

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos.latentwire.v1 import latentwire_pb2 as pb
from tests.conftest import free_port
from tests.serve_cluster import TINY_BRIDGE_ID, replicas, start_ray, tiny_config

TOKEN = secrets.token_hex(16)
INTERNAL = secrets.token_hex(16)  # Translate and Receive are internal hops: fuzzed with the internal token
EXAMPLES = int(os.environ.get("LATENTWIRE_FUZZ_EXAMPLES", "300"))
settings.register_profile("latentwire-fuzz", max_examples=EXAMPLES, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                                 HealthCheck.data_too_large])
FORBIDDEN = {"INTERNAL", "UNKNOWN"}
OUTCOMES: collections.Counter = collections.Counter()  # (rpc, status) -> count, for the record
FAILURES: list = []


@pytest.fixture(scope="module")
def cluster(tiny_bridge_path):
    from services import local

    start_ray()
    cfg = tiny_config(tiny_bridge_path, free_port(), free_port(), token=TOKEN, internal_token=INTERNAL)
    local.deploy(cfg)
    yield local.grpc_address(cfg)
    local.shutdown()


@pytest.fixture(scope="module")
def client(cluster):
    from services.client import NO_RETRY, LatentWireClient

    with LatentWireClient(cluster, token=TOKEN, timeout_s=60, retry=NO_RETRY) as c:
        yield c


# ---- strategies ------------------------------------------------------------------------------------
INT64 = st.integers(-(2**63), 2**63 - 1)
INT32 = st.integers(-(2**31), 2**31 - 1)
UINT32 = st.integers(0, 2**32 - 1)
DIM = st.one_of(st.integers(1, 8), st.sampled_from([0, -1, 64, 96, 65, 4096, 2**31, 2**40]), INT64)
SPECIAL = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1e38, -1e38, 65504.0, 1e-45]
TEXT = st.one_of(st.text(max_size=64), st.sampled_from(["", " ", "\n\t", "<s>", "</s>", "[INST]", "<|eot_id|>",
                                                       "\x00", "é" * 300, "lisbon " * 600]),
                 st.text(min_size=3000, max_size=6000))


SCALES = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, -1.0, 1e38, 3.4e38, 1e-45, 1.0]


@st.composite
def tensors(draw, rows=None, width=None) -> pb.Tensor:
    dtype = draw(st.one_of(st.sampled_from([pb.FLOAT32, pb.FLOAT16, pb.BFLOAT16, pb.INT8]),
                           st.sampled_from([0, 5, 99]), INT32))
    if draw(st.booleans()):  # a well-formed 2-D tensor (the right width half of the time)
        shape = [draw(st.integers(1, 12)) if rows is None else rows, width if width and draw(st.booleans())
                 else draw(DIM)]
    else:
        shape = draw(st.lists(DIM, max_size=5))
    item = {pb.FLOAT32: 4, pb.FLOAT16: 2, pb.BFLOAT16: 2, pb.INT8: 1}.get(dtype, 4)
    n = math.prod(shape) if shape and all(0 < d < 1 << 20 for d in shape) else None
    how = draw(st.sampled_from(["exact", "random", "short", "long"]))
    if how == "exact" and n is not None and n * item <= 1 << 20:
        k = min(n, 512)  # hypothesis draws at most a few thousand list items: tile a drawn block
        if dtype == pb.INT8:
            block = draw(st.binary(min_size=k, max_size=k))
            data = (block * (n // k + 1))[:n]
        else:
            block = draw(st.lists(st.one_of(st.floats(width=32), st.sampled_from(SPECIAL)), min_size=k, max_size=k))
            values = (block * (n // k + 1))[:n]
            fmt = "<%df" % n if item == 4 else "<%de" % n
            try:
                data = struct.pack(fmt, *values)
            except (OverflowError, struct.error):
                data = b"\x7f" * (n * item)
    elif how in ("short", "long") and n is not None and n * item <= 1 << 20:
        data = bytes(draw(st.integers(0, 255)) for _ in range(1)) * max(n * item + (-1 if how == "short" else 1), 0)
    else:
        data = draw(st.binary(max_size=4096))
    scale = []
    if dtype == pb.INT8 or draw(st.integers(0, 9)) == 0:  # INT8 scales; now and then scales on a float tensor
        m = n // shape[-1] if n is not None else 0
        count = draw(st.sampled_from(["rows", "rows", "rows", "random"]))
        count = min(m, 4096) if count == "rows" else draw(st.integers(0, 64))
        value = draw(st.one_of(st.floats(min_value=1e-30, max_value=1e30), st.sampled_from(SCALES)))
        scale = [value] * count if count > 64 or draw(st.booleans()) else draw(
            st.lists(st.one_of(st.floats(width=32), st.sampled_from(SCALES)), min_size=count, max_size=count))
    return pb.Tensor(shape=shape, dtype=dtype, data=data, scale=scale)


@st.composite
def provenances(draw, good: dict) -> pb.Provenance:
    fields = {}
    for name, value in good.items():
        kind = draw(st.sampled_from(["good"] * 6 + ["random", "absent"]))
        if kind == "good":
            fields[name] = value
        elif kind == "random":
            fields[name] = draw(INT32) if isinstance(value, int) else draw(TEXT)
    if draw(st.booleans()):
        fields["request_id"] = draw(TEXT)
    return pb.Provenance(**fields)


GOOD_HIDDEN = dict(source_model="tiny-llama", source_layer=2, source_hidden_size=64)
GOOD_LATENT = dict(target_model="tiny-mistral", target_hidden_size=96, bridge_id=TINY_BRIDGE_ID)


def mostly(good, bad):
    """Three draws in four from `good`: deep checks (and the models) see random input too."""
    return st.one_of(good, good, good, bad)


MODE = mostly(st.integers(0, 3), INT32)
NEW_TOKENS = mostly(st.integers(0, 40), UINT32)
QUESTION = mostly(st.text(min_size=1, max_size=200), TEXT)


@st.composite
def translate_calls(draw):
    return "Translate", pb.HiddenStatePacket(hidden=draw(tensors(width=64)), provenance=draw(provenances(GOOD_HIDDEN)))


@st.composite
def receive_calls(draw):
    req = pb.ReceiveRequest(request_id=draw(TEXT), mode=draw(MODE), question=draw(QUESTION),
                            max_new_tokens=draw(NEW_TOKENS))
    payload = draw(st.sampled_from(["latent", "text", "none"]))
    if payload == "latent":
        req.latent.CopyFrom(pb.LatentPacket(soft_tokens=draw(tensors(width=96)), provenance=draw(provenances(GOOD_LATENT))))
    elif payload == "text":
        req.text.CopyFrom(pb.TextPacket(text=draw(TEXT), num_tokens=draw(UINT32)))
    return "Receive", req


@st.composite
def ask_calls(draw):
    req = pb.AskRequest(request_id=draw(mostly(st.from_regex(r"[A-Za-z0-9._:\-]{0,128}", fullmatch=True), TEXT)),
                        context=draw(TEXT), question=draw(QUESTION), mode=draw(MODE),
                        max_new_tokens=draw(NEW_TOKENS), target_agent=draw(mostly(st.just(""), TEXT)),
                        message_tokens=draw(NEW_TOKENS))
    return draw(st.sampled_from(["Ask", "Ask", "AskStream"])), req


CALLS = st.one_of(translate_calls(), receive_calls(), ask_calls())
AUTH = st.one_of(st.just(None), st.just(None), st.just(None), st.just(None), st.just(None), st.just(None),
                 st.just(None), st.just(None), st.just(None),
                 st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=80))


def invoke(client, rpc: str, request, auth: str | None) -> str:
    meta = client.metadata({"Translate": "bridge", "Receive": "target"}.get(rpc, "source"))
    if rpc in ("Translate", "Receive"):
        meta = tuple(m for m in meta if m[0] != "authorization") + (("authorization", f"Bearer {INTERNAL}"),)
    if auth is not None:  # replace the token with a random authorization value
        meta = tuple(m for m in meta if m[0] != "authorization") + (("authorization", auth),)
    try:
        if rpc == "Translate":
            client.bridge.Translate(request, metadata=meta, timeout=60)
        elif rpc == "Receive":
            client.agent.Receive(request, metadata=meta, timeout=60)
        elif rpc == "Ask":
            client.agent.Ask(request, metadata=meta, timeout=60)
        else:
            for _ in client.agent.AskStream(request, metadata=meta, timeout=60):
                pass
        return "OK"
    except grpc.RpcError as err:
        if err.code().name in FORBIDDEN:
            FAILURES.append((rpc, err.code().name, err.details(), str(request)[:300]))
        return err.code().name


# ---- the properties --------------------------------------------------------------------------------
@settings(settings.get_profile("latentwire-fuzz"))
@given(msg=tensors(width=96), ndim=st.sampled_from([None, 2]), last_dim=st.sampled_from([None, 96]))
def test_codec_decode_refuses_clearly_or_returns_finite_values(msg, ndim, last_dim):
    """The codec alone (no cluster): every tensor decodes to finite values of its shape or is refused
    with InvalidArgument / ResourceExhausted naming a field of the tensor."""
    from latentwire import codec
    from latentwire.errors import InvalidArgument, ResourceExhausted

    try:
        t = codec.decode(msg, field="t", ndim=ndim, last_dim=last_dim, max_elements=1 << 20)
    except (InvalidArgument, ResourceExhausted) as err:
        assert err.field in {"t.dtype", "t.shape", "t.data", "t.scale"}
        return
    assert list(t.shape) == list(msg.shape) and bool(torch.isfinite(t).all())


@settings(settings.get_profile("latentwire-fuzz"))
@given(rows=st.integers(1, 8), width=st.integers(1, 64), exp=st.integers(-30, 30),
       special=st.sampled_from([None, float("nan"), float("inf"), 0.0]), seed=st.integers(0, 2**31 - 1))
def test_codec_int8_round_trip_is_bounded_or_refused(rows, width, exp, special, seed):
    """Any float32 tensor through the int8 code: within half a step of its row's absmax, or (a
    non-finite value) refused at the receiver naming the scale."""
    from latentwire import codec
    from latentwire.errors import InvalidArgument

    x = torch.randn(rows, width, generator=torch.Generator().manual_seed(seed)) * 10.0 ** exp
    if special is not None:
        x[rows // 2, width // 2] = special
    msg = pb.Tensor.FromString(codec.encode(x, "int8").SerializeToString())
    if not bool(torch.isfinite(x).all()):
        with pytest.raises(InvalidArgument) as err:
            codec.decode(msg)
        assert err.value.field == "tensor.scale"
        return
    y = codec.decode(msg, ndim=2, last_dim=width)
    assert torch.equal(y, codec.wire(x, "int8"))
    step = x.abs().amax(dim=1, keepdim=True) / 127
    assert ((y - x).abs() <= step / 2 * (1 + 1e-5) + 1e-45).all()


@pytest.fixture(scope="module")
def before(client):
    client.ask("Alice keeps the red key in Lisbon.", "Where is the key?", "latent", max_new_tokens=2)
    return {a.actor_id: a.pid for a in replicas()}


@settings(settings.get_profile("latentwire-fuzz"))
@given(call=CALLS, auth=AUTH)
def test_no_input_gets_internal_or_unknown(client, before, call, auth):
    rpc, request = call
    status = invoke(client, rpc, request, auth)
    OUTCOMES[f"{rpc}:{status}"] += 1
    assert status not in FORBIDDEN, FAILURES[-1]


def test_no_replica_restarted_and_a_good_request_succeeds(client, before):
    after = {a.actor_id: a.pid for a in replicas()}
    total = sum(OUTCOMES.values())
    print("\nfuzz:", json.dumps(dict(examples=total, by_status=dict(sorted(OUTCOMES.items())),
                                     internal_or_unknown=len(FAILURES), replicas_before=len(before),
                                     restarted=len(set(before.items()) ^ set(after.items())))))
    assert total >= min(EXAMPLES, 100)  # the fuzz ran
    assert after == before  # same actors, same processes: no input killed a replica
    reply = client.ask("Alice keeps the red key in Lisbon.", "Where is the key?", "latent", max_new_tokens=4)
    assert reply.answer_tokens > 0
