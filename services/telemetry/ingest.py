"""Standard OTLP/gRPC span ingest, open to every process of the mesh and the Collector.

Because any mesh peer may export spans, spans decide nothing that matters: statistics, SLOs
and the tool health the router routes on come from the gateway's per-request records, and a
span's ``toolmesh.tenant`` attributes a trace to a tenant only when the gateway exported it
(its certificate's role, after ``peer_aliases``). Each stored span records the certificate
name of the peer that exported it. Without peer authentication (plaintext development mode,
where every RPC is open anyway) every exporter is believed.
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc
from google.protobuf.message import DecodeError
from grpc import aio
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from services.kit.errors import abort_invalid
from services.kit.interceptors import abort_undecodable
from services.kit.metrics import meter
from services.kit.peers import GATEWAY, peer_common_name
from services.telemetry import spans
from services.telemetry.forward import Forwarder
from services.telemetry.store import SpanStore

_SPANS_STORED = meter().create_counter(
    "toolmesh.telemetry.spans_stored", unit="{span}", description="Spans accepted over OTLP"
)


class TraceService:
    """Decode, insert in one transaction, answer.

    Registered with a pass-through deserializer (not through the generated TraceServiceServicer
    registration) so that bytes that are no ExportTraceServiceRequest get INVALID_ARGUMENT
    rather than grpc's UNKNOWN, and so forwarding sends the received bytes unchanged.
    """

    SERVICE = trace_service_pb2.DESCRIPTOR.services_by_name["TraceService"].full_name

    def __init__(
        self,
        store: SpanStore,
        forwarder: Forwarder | None,
        *,
        peers_authenticated: bool,
        aliases: Mapping[str, str],
        keep_every_trace: bool,
    ) -> None:
        self._store = store
        self._forwarder = forwarder
        self._peers_authenticated = peers_authenticated
        self._aliases = dict(aliases)
        self._keep_every_trace = keep_every_trace

    def add_to_server(self, server: aio.Server) -> None:
        handler = grpc.unary_unary_rpc_method_handler(
            self.Export,
            response_serializer=trace_service_pb2.ExportTraceServiceResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(self.SERVICE, {"Export": handler}),)
        )

    def speaks_for_tenants(self, common_name: str) -> bool:
        if not self._peers_authenticated:
            return True
        return self._aliases.get(common_name, common_name) == GATEWAY

    async def Export(
        self, raw: bytes, context: aio.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        try:
            request = trace_service_pb2.ExportTraceServiceRequest.FromString(raw)
        except DecodeError as error:
            method = f"/{self.SERVICE}/Export"
            await abort_undecodable(context, method, len(raw), type(error).__name__)
        exporter = peer_common_name(context) if self._peers_authenticated else ""
        records, violations = spans.decode(
            request, exporter=exporter, speaks_for_tenants=self.speaks_for_tenants(exporter)
        )
        if violations:
            await abort_invalid(context, violations)
        if records:
            await self._store.insert(records, kept=self._keep_every_trace)
            _SPANS_STORED.add(len(records))
            if self._forwarder is not None:
                self._forwarder.offer(raw)
        return trace_service_pb2.ExportTraceServiceResponse()
