"""A raw gRPC-over-HTTP/2 call with headers no gRPC client library will send (non-UTF-8
values, junk in ``-bin`` headers), for wire tests against real servers."""

from __future__ import annotations

import socket
import ssl
import struct
from pathlib import Path

import h2.config
import h2.connection
import h2.events


def raw_call(
    port: int,
    path: str,
    body: bytes = b"",
    headers: tuple[tuple[bytes, bytes], ...] = (),
    ca_file: Path | None = None,
    timeout: float = 10.0,
    client_cert: tuple[Path, Path] | None = None,
) -> dict[str, str]:
    """Send one unary call and return the response headers and trailers (grpc-status ...).

    With ``ca_file`` the call goes over TLS (ALPN h2) verified against that CA, presenting
    ``client_cert`` (certificate, key) when given (inner services require one).
    """
    sock: socket.socket = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    if ca_file is not None:
        context = ssl.create_default_context(cafile=str(ca_file))
        context.set_alpn_protocols(["h2"])
        if client_cert is not None:
            context.load_cert_chain(*client_cert)
        sock = context.wrap_socket(sock, server_hostname="localhost")
    config = h2.config.H2Configuration(
        client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False
    )
    conn = h2.connection.H2Connection(config)
    conn.initiate_connection()
    stream = conn.get_next_available_stream_id()
    conn.send_headers(
        stream,
        [
            (b":method", b"POST"),
            (b":scheme", b"https" if ca_file else b"http"),
            (b":path", path.encode()),
            (b":authority", b"localhost"),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            *headers,
        ],
    )
    conn.send_data(stream, b"\x00" + struct.pack(">I", len(body)) + body, end_stream=True)
    sock.sendall(conn.data_to_send())
    answer: dict[str, str] = {}
    try:
        while "grpc-status" not in answer and "reset" not in answer:
            data = sock.recv(65536)
            if not data:
                answer.setdefault("reset", "connection closed")
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                    answer.update(
                        {k.decode(): v.decode(errors="replace") for k, v in event.headers}
                    )
                elif isinstance(event, h2.events.StreamReset):
                    answer["reset"] = str(event.error_code)
                elif isinstance(event, h2.events.ConnectionTerminated):
                    answer["reset"] = f"goaway {event.error_code}"
            sock.sendall(conn.data_to_send())
    finally:
        sock.close()
    return answer
