"""The bridge's signature on a latent packet, and the target's check of it.

Only the bridge turns hidden states into soft tokens; the target reads soft tokens as its prompt. So
the bridge signs each `LatentPacket` it sends (HMAC-SHA256, keyed from the services' internal token:
`services.auth.BearerAuth.packet_key`), and a target holding the same key refuses a packet whose
signature is missing or does not match: altered soft tokens, edited provenance (another request,
model or bridge) or a packet made by anyone but a bridge of this deployment.

What is signed is a canonical byte string, not the protobuf serialization (which no implementation
promises to keep byte-stable): a domain tag, then each field length-prefixed, in a fixed order,
the tensor's bytes by their sha256.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

from latentwire.errors import InvalidArgument, PermissionDenied
from protos.latentwire.v1 import latentwire_pb2 as pb

DOMAIN = b"latentwire.v1.LatentPacket"
SIZE = hashlib.sha256().digest_size  # bytes of a signature
_PROVENANCE = ("request_id", "source_model", "source_layer", "source_hidden_size", "target_model",
               "target_hidden_size", "bridge_id", "bridge_sha256")


def signed_bytes(packet: pb.LatentPacket) -> bytes:
    """The canonical bytes a packet's signature covers: provenance, shape, dtype, data and scale."""
    p, t = packet.provenance, packet.soft_tokens
    parts = [DOMAIN] + [str(getattr(p, name)).encode() for name in _PROVENANCE]
    parts += [",".join(map(str, t.shape)).encode(), str(t.dtype).encode(),
              hashlib.sha256(t.data).digest(),
              hashlib.sha256(struct.pack(f"<{len(t.scale)}f", *t.scale)).digest()]
    return b"".join(struct.pack("<Q", len(part)) + part for part in parts)


def signature(packet: pb.LatentPacket, key: bytes) -> bytes:
    return hmac.new(key, signed_bytes(packet), hashlib.sha256).digest()


def sign(packet: pb.LatentPacket, key: bytes | None) -> None:
    """Set `packet.signature` (left empty without a key: a deployment with no internal token)."""
    if key:
        packet.signature = signature(packet, key)


def verify(packet: pb.LatentPacket, key: bytes | None, field: str = "latent.signature") -> None:
    """Refuse a packet without a valid signature when this receiver holds a key; accept any without."""
    if not key:
        return
    if not packet.signature:
        raise PermissionDenied("missing: this target accepts only latent packets signed by a bridge of its "
                               "deployment (the bridge signs with the internal token)", field)
    if len(packet.signature) != SIZE:
        raise InvalidArgument(f"expected {SIZE} bytes (HMAC-SHA256), got {len(packet.signature)}", field)
    if not hmac.compare_digest(packet.signature, signature(packet, key)):
        raise PermissionDenied("does not match the packet's soft tokens and provenance (altered after the "
                               "bridge signed it, or signed with another key)", field)
