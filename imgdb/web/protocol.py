"""uvicorn's HTTP/1.1 protocol with a deadline on request heads (slowloris), and its refusals of
malformed or oversized heads as JSON, like every other refusal.

uvicorn closes idle keep-alive connections, but a connection that sends nothing after connecting,
or sends its headers a byte at a time (each byte re-arming nothing), is kept forever; enough of
them hold every socket the server has. Here a connection must deliver a complete request head
within HEADER_TIMEOUT of connecting or of its previous response, or it is closed. Bodies have a
deadline of their own, enforced where the app reads them (:data:`imgdb.web.app.BODY_TIMEOUT`).

A head h11 cannot parse never reaches the app: uvicorn answers it with a plain-text 400 of its own,
whatever h11 said was wrong. Here the answer takes h11's status (431 for a head larger than
uvicorn's limit on it, ``h11_max_incomplete_event_size``) and the app's ``{"error": ...}`` body.
"""

from __future__ import annotations

import asyncio
import json
from http import HTTPStatus
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE, H11Protocol

#: Seconds a connection has to send a complete request head.
HEADER_TIMEOUT = 10.0


class _Connection(h11.Connection):
    """h11's connection, keeping the status its refusal of the client's bytes suggests."""

    refused_with = HTTPStatus.BAD_REQUEST

    def next_event(self) -> Any:
        try:
            return super().next_event()
        except h11.RemoteProtocolError as exc:
            self.refused_with = HTTPStatus(exc.error_status_hint) if exc.error_status_hint in iter(HTTPStatus) \
                else HTTPStatus.BAD_REQUEST
            raise


class GuardedH11Protocol(H11Protocol):
    """:class:`H11Protocol` that closes connections slower than HEADER_TIMEOUT to send a head, and
    refuses a bad head with h11's status and a JSON reason."""

    header_timeout = HEADER_TIMEOUT
    _head_deadline: asyncio.TimerHandle | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn = _Connection(h11.SERVER, self.config.h11_max_incomplete_event_size or
                                DEFAULT_MAX_INCOMPLETE_EVENT_SIZE)

    def send_400_response(self, msg: str) -> None:
        status = getattr(self.conn, "refused_with", HTTPStatus.BAD_REQUEST)
        reason = "request head is over the server's limit" if status == HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE \
            else "malformed HTTP request"
        body = json.dumps({"error": f"{reason} ({status.value} {status.phrase})"}).encode()
        for event in (h11.Response(status_code=status.value, reason=status.phrase.encode(),
                                   headers=[(b"content-type", b"application/json"), (b"connection", b"close"),
                                            (b"content-length", str(len(body)).encode())]),
                      h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))

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
