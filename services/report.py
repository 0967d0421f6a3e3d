"""Human-readable and JSON views of AskReply: the per-stage latency table."""

from __future__ import annotations

from google.protobuf.json_format import MessageToDict

from protos.latentwire.v1 import latentwire_pb2 as pb

STAGES = [("source_prefill_ms", "src prefill"), ("source_decode_ms", "src decode"),
          ("packet_encode_ms", "encode"), ("bridge_hop_ms", "bridge hop"), ("bridge_ms", "bridge"),
          ("target_hop_ms", "target hop"), ("packet_decode_ms", "decode"),
          ("target_prefill_ms", "tgt prefill"), ("target_decode_ms", "tgt decode")]


def reply_dict(reply: pb.AskReply, client_ms: float | None = None) -> dict:
    d = MessageToDict(reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    d["mode"] = pb.Mode.Name(reply.mode)
    d["packet_bytes"] = int(d["packet_bytes"])
    if client_ms is not None:
        d["client_ms"] = client_ms
    return d


def table(rows: list[tuple[str, pb.AskReply, float]]) -> str:
    """rows: (label, reply, client round-trip ms) -> a fixed-width table, all times in ms."""
    head = ["request", "mode"] + [h for _, h in STAGES] + ["source total", "end-to-end", "bytes", "answer"]
    lines = [head]
    for label, r, client_ms in rows:
        t = r.timings
        lines.append([label, pb.Mode.Name(r.mode)] + [f"{getattr(t, f):.1f}" for f, _ in STAGES]
                     + [f"{t.source_total_ms:.1f}", f"{client_ms:.1f}", str(r.packet_bytes), repr(r.answer[:40])])
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    fmt = lambda row: "  ".join(c.rjust(w) if 1 < i < len(head) - 1 else c.ljust(w)  # noqa: E731
                                for i, (c, w) in enumerate(zip(row, widths)))
    return "\n".join([fmt(lines[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in lines[1:]])
