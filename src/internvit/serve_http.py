"""The connections under `internvit serve`: uvicorn's h11 protocol with the limits a server open to clients needs.

References:
    - uvicorn's `H11Protocol` (`uvicorn/protocols/http/h11_impl.py`, 0.55): `timeout_keep_alive` is armed only
      after a response, so a connection that never sends a byte is held forever and a request may take forever to
      arrive; `limit_concurrency` answers 503 per request but keeps accepting connections; a response sent before
      the request body was read either drains the whole body (keep-alive) or closes at once (`Connection: close`).
    - RFC 9112 §9.6 (tear-down): a server that closes while the client is still sending should half-close and keep
      reading for a while, or the client's TCP stack may drop the response on the reset. nginx does this as
      `lingering_close` (`lingering_time` 30 s, `lingering_timeout` 5 s); its `keepalive_timeout` (75 s) and
      `client_header_timeout` / `client_body_timeout` (60 s) are the idle and read timeouts.
    - h11's `max_incomplete_event_size` (16 KiB here, uvicorn's default): request headers over it get 400.

Differs from uvicorn: the idle timeout runs from accept as well as between requests; a request must arrive whole
(headers and body) within `read` seconds of its first byte; connections past `max_connections` are closed at once;
and a response sent while the request body is still coming closes the connection lingeringly: the write side is
shut (the client reads the response and end of stream), then the rest of the body is read and discarded, at most
`linger_bytes` bytes for `linger_seconds` seconds, before the socket is closed.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


@dataclass(frozen=True, kw_only=True)
class ConnectionLimits:
    """Per-connection limits, in seconds and bytes (see the module docstring)."""

    keep_alive: float = 5.0  # idle: after accept or after a response, until a request's first byte
    read: float = 30.0  # from a request's first byte until its last (headers and body)
    max_connections: int = 512
    linger_bytes: int = 16 << 20
    linger_seconds: float = 30.0

    def protocol(self):
        """The protocol class for `uvicorn.Config(http=...)`."""
        return functools.partial(LimitedH11Protocol, limits=self)


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with `ConnectionLimits`."""

    def __init__(self, *args, limits: ConnectionLimits, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.timeout_keep_alive = limits.keep_alive
        self._socket: asyncio.Transport | None = None
        self._read_timer: asyncio.TimerHandle | None = None
        self._linger_left: int | None = None  # while closing lingeringly: bytes still to discard

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._socket = transport
        super().connection_made(_LingeringTransport(transport, self))
        if len(self.connections) > self.limits.max_connections:
            self.logger.warning("connection closed: --max-connections %d reached", self.limits.max_connections)
            transport.close()
            return
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def connection_lost(self, exc: Exception | None) -> None:
        self._set_read_timer(False)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._linger_left is not None:  # the rest of a body nobody reads
            self._linger_left -= len(data)
            if self._linger_left <= 0:
                self._socket.close()
            return
        super().data_received(data)
        self._watch_read()

    def on_response_complete(self) -> None:
        if self.conn.their_state is h11.SEND_BODY and self._linger_left is None:
            # Answered before the body was read (401, 413): never drain an unbounded body to keep the connection.
            self.server_state.total_requests += 1
            self.close_lingering()
            return
        super().on_response_complete()
        self._watch_read()  # a pipelined request may have begun

    def close_lingering(self) -> None:
        """Close, or, while the client is still sending its body, half-close and discard the rest (bounded)."""
        sock = self._socket
        if self._linger_left is not None or sock.is_closing() or self.conn.their_state is not h11.SEND_BODY \
                or not sock.can_write_eof():
            sock.close()
            return
        self._set_read_timer(False)
        self._linger_left = self.limits.linger_bytes
        sock.write_eof()  # after the buffered response: the client reads it, then end of stream
        self.flow.resume_reading()
        self.loop.call_later(self.limits.linger_seconds, sock.close)

    def _watch_read(self) -> None:
        """A request partly received must be whole within `limits.read` seconds of when it was first seen."""
        state = self.conn.their_state
        partial = state is h11.SEND_BODY or (state is h11.IDLE and bool(self.conn.trailing_data[0]))
        self._set_read_timer(partial and self._linger_left is None)

    def _set_read_timer(self, on: bool) -> None:
        if on and self._read_timer is None:
            self._read_timer = self.loop.call_later(self.limits.read, self._read_timed_out)
        elif not on and self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _read_timed_out(self) -> None:
        self._read_timer = None
        self.logger.info("connection closed: a request took over --timeout-read %g s to arrive", self.limits.read)
        self._socket.close()  # a handler waiting for the body sees the client disconnect


class _LingeringTransport:
    """The socket as uvicorn's protocol and request cycles see it: `close()` closes lingeringly."""

    def __init__(self, transport: asyncio.Transport, protocol: LimitedH11Protocol) -> None:
        self._transport, self._protocol = transport, protocol

    def __getattr__(self, name: str):
        return getattr(self._transport, name)

    def close(self) -> None:
        self._protocol.close_lingering()

    def is_closing(self) -> bool:
        return self._protocol._linger_left is not None or self._transport.is_closing()
