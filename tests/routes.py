"""A threaded HTTP server on 127.0.0.1 with a handler function per path, for tests that need a
peer misbehaving on purpose (redirects, stalls, lying headers)."""

from __future__ import annotations

import ssl
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Route = Callable[[BaseHTTPRequestHandler], None]


class Server:
    """A threaded HTTP server on 127.0.0.1 with per-path handler functions."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self.routes: dict[str, Route] = {}
        self.stop = threading.Event()  # released at teardown so stalling handlers end promptly
        self.requests: list[tuple[str, dict[str, str]]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - http.server naming
                server.requests.append((self.path, dict(self.headers.items())))
                route = server.routes.get(self.path.split("?")[0])
                if route is None:
                    send(self, 404, {"Content-Type": "text/plain"}, b"no such path")
                else:
                    route(self)
                self.close_connection = True

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        if ssl_context is not None:
            self.httpd.socket = ssl_context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05})
        self.thread.daemon = True
        self.thread.start()

    def url(self, path: str, scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def send(
    handler: BaseHTTPRequestHandler,
    status: int,
    headers: dict[str, str],
    body: bytes = b"",
    *,
    content_length: bool = True,
) -> None:
    """Write a complete response."""
    handler.send_response(status)
    for name, value in headers.items():
        handler.send_header(name, value)
    if content_length:
        handler.send_header("Content-Length", str(len(body)))
    handler.send_header("Connection", "close")
    handler.end_headers()
    handler.wfile.write(body)


def redirect_to(location: str, status: int = 302) -> Route:
    return lambda h: send(h, status, {"Location": location})
