"""uvicorn's HTTP/1.1 protocol with a deadline on request heads (slowloris).

uvicorn closes idle keep-alive connections, but a connection that sends nothing after connecting,
or sends its headers a byte at a time (each byte re-arming nothing), is kept forever; enough of
them hold every socket the server has. Here a connection must deliver a complete request head
within HEADER_TIMEOUT of connecting or of its previous response, or it is closed. Bodies have a
deadline of their own, enforced where the app reads them (:data:`imgdb.web.app.BODY_TIMEOUT`).
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

#: Seconds a connection has to send a complete request head.
HEADER_TIMEOUT = 10.0


class GuardedH11Protocol(H11Protocol):
    """:class:`H11Protocol` that closes connections slower than HEADER_TIMEOUT to send a head."""

    header_timeout = HEADER_TIMEOUT
    _head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state in (h11.SEND_BODY, h11.DONE):  # the head is complete
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request on this connection gets the same deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._head_deadline = self.loop.call_later(self.header_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _too_slow(self) -> None:
        self._head_deadline = None
        if not self.transport.is_closing() and self.conn.their_state not in (h11.SEND_BODY, h11.DONE):
            self.transport.close()


def guarded_protocol(header_timeout: float = HEADER_TIMEOUT) -> type[GuardedH11Protocol]:
    """The protocol class for ``uvicorn.run(http=...)``, with its deadline."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"header_timeout": header_timeout})
