"""The bridge servicer: hidden-state packet in, soft-token packet out (BridgeService.Translate)."""

from __future__ import annotations

import torch

from bridge.load import default_weights_path, load_bridge
from latentwire import codec
from latentwire.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from latentwire.merging import merge_slots
from latentwire.runtime import now_ms
from latentwire.settings import BridgeSettings
from protos.latentwire.v1 import latentwire_pb2 as pb
from services import a2a_wire, packets, signing
from services.auth import BearerAuth, refusals
from services.batching import Batcher
from services.status import rpc

AGENT_SERVICE = pb.DESCRIPTOR.services_by_name["AgentService"]


class BridgeServicer(refusals("bridge", AGENT_SERVICE, a2a_wire.SERVICE)):
    """Translate, and UNIMPLEMENTED for every AgentService and A2A RPC routed here (`services.auth.refusals`)."""

    def __init__(self, settings: dict | BridgeSettings):
        self.settings = s = BridgeSettings.model_validate(settings)
        if s.threads:
            torch.set_num_threads(s.threads)
        self.bridge = load_bridge(s.weights or default_weights_path(), device=s.device, target_path=s.target_path,
                                  search_dtype=s.search_dtype, token_index=s.token_index,
                                  sha256=s.weights_sha256)
        self.cfg = self.bridge.cfg
        self.limits = s.limits
        self.auth = BearerAuth.of(s)  # checked by @rpc (Translate takes the internal token); keys the signatures
        # concurrent Translate calls share one padded forward
        self.batcher = Batcher(lambda jobs: self.translate_many(*zip(*jobs)), s.max_batch_size,
                               s.batch_wait_timeout_s)

    def Check(self, request, grpc_context=None):
        from grpc_health.v1 import health_pb2

        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    @rpc(pb.TranslateReply)
    async def Translate(self, packet: pb.HiddenStatePacket, grpc_context=None) -> pb.TranslateReply:
        t0 = now_ms()
        p, cfg = packet.provenance, self.cfg
        packets.expect("provenance.source_model", p.source_model, cfg.source_model, "source model")
        packets.expect("provenance.source_layer", p.source_layer, cfg.source_layer, "source layer")
        packets.expect("provenance.source_hidden_size", p.source_hidden_size, cfg.d_src, "source hidden size")
        if p.target_model:
            packets.expect("provenance.target_model", p.target_model, cfg.target_model, "target model")
        # sizes first, from the message as it came: nothing is decoded or copied for a packet refused
        cap = self.limits.max_packet_tokens
        rows = packet.hidden.shape[0] if packet.hidden.shape else 0
        if rows > cap:
            raise ResourceExhausted(f"{rows} source tokens exceed the limit of {cap} (max_packet_tokens)",
                                    "hidden.shape")
        n_ids = len(packet.source_token_ids)
        if n_ids > cap:
            raise ResourceExhausted(f"{n_ids} source token ids exceed the limit of {cap} (max_packet_tokens)",
                                    "source_token_ids")
        if n_ids and n_ids != rows:
            raise InvalidArgument(f"{n_ids} source token ids for {rows} rows of hidden", "source_token_ids")
        slot_of, slot_weight = self._slots(packet, rows)
        hidden = codec.decode(packet.hidden, field="hidden", ndim=2, last_dim=cfg.d_src,
                              max_elements=self.limits.max_packet_elements)
        ids = None
        if n_ids:  # a search hint for the token index; wrong ones are refused, not guessed
            ids = torch.tensor(packet.source_token_ids, dtype=torch.long)
            if int(ids.min()) < 0:
                raise InvalidArgument(f"source token id {int(ids.min())} is negative", "source_token_ids")
        t1 = now_ms()
        soft, batch_size = await self.batcher.submit((hidden, ids))
        soft = merge_slots(soft, slot_of, slot_weight)  # one soft token per slot (none given: per row)
        t2 = now_ms()
        prov = pb.Provenance()
        prov.CopyFrom(p)
        prov.target_model, prov.target_hidden_size = cfg.target_model, cfg.d_tgt
        prov.bridge_id, prov.bridge_sha256 = self.bridge.bridge_id, self.bridge.sha256
        latent = pb.LatentPacket(soft_tokens=codec.encode(soft, self.settings.wire_dtype), provenance=prov)
        signing.sign(latent, self.auth.packet_key)  # a target holding the key refuses what no bridge signed
        t3 = now_ms()
        return pb.TranslateReply(latent=latent, bridge_ms=t2 - t1, packet_decode_ms=t1 - t0,
                                 packet_encode_ms=t3 - t2, total_ms=now_ms() - t0, batch_size=batch_size)

    def _slots(self, packet: pb.HiddenStatePacket, rows: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """A merging selector's slot groups (latentwire.merging), checked: one slot and one weight per
        row, slots numbered 0, 1, ... in row order, each slot's weights positive and summing to 1;
        None, None for a packet without them."""
        n_of, n_w = len(packet.slot_of), len(packet.slot_weight)
        if not n_of and not n_w:
            return None, None
        for field, n in (("slot_of", n_of), ("slot_weight", n_w)):
            if n != rows:
                raise InvalidArgument(f"{n} {field} entries for {rows} rows of hidden", field)
        if self.bridge.num_soft_tokens(rows) != rows:
            raise FailedPrecondition(f"bridge {self.bridge.bridge_id} ({self.bridge.arch}) makes "
                                     f"{self.bridge.num_soft_tokens(rows)} soft tokens of {rows} rows, not one per "
                                     f"row: it cannot merge slots", "slot_of")
        slot_of = torch.tensor(packet.slot_of, dtype=torch.long)
        steps = torch.diff(slot_of, prepend=slot_of.new_tensor([-1]))
        if not bool(((steps == 0) | (steps == 1)).all()):
            raise InvalidArgument("slots must number the rows 0, 1, ... in order, the rows of one slot adjacent",
                                  "slot_of")
        weight = torch.tensor(packet.slot_weight, dtype=torch.float32)
        sums = torch.zeros(int(slot_of[-1]) + 1).index_add_(0, slot_of, weight)
        if not bool(torch.isfinite(weight).all() and (weight > 0).all() and ((sums - 1).abs() <= 1e-3).all()):
            raise InvalidArgument("each slot's weights must be positive and sum to 1", "slot_weight")
        return slot_of, weight

    @torch.no_grad()
    def translate_many(self, hiddens: list[torch.Tensor], token_ids: list[torch.Tensor | None] | None = None
                       ) -> list[torch.Tensor]:
        """Soft tokens (`bridge.num_soft_tokens(T_i)` x d_tgt) of several (T_i x d_src) packets [and
        their rows' source token ids, for a bridge's token index; -1 where a packet has none]:
        right-padded, masked, one forward."""
        n = max(h.shape[0] for h in hiddens)
        x = hiddens[0].new_zeros(len(hiddens), n, hiddens[0].shape[-1], dtype=torch.float32)
        mask = torch.zeros(len(hiddens), n, dtype=torch.long)
        ids = torch.full((len(hiddens), n), -1, dtype=torch.long)
        for i, h in enumerate(hiddens):
            x[i, :h.shape[0]], mask[i, :h.shape[0]] = h, 1
            if token_ids is not None and token_ids[i] is not None:
                ids[i, :h.shape[0]] = token_ids[i]
        dev = self.settings.device
        soft = self.bridge(x.to(dev), mask.to(dev), token_ids=ids.to(dev))
        # a kind with one soft token per row leaves soft tokens of the padding: drop them
        return [soft[i, :self.bridge.num_soft_tokens(h.shape[0])] for i, h in enumerate(hiddens)]
