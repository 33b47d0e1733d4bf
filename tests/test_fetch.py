"""Tests for imgdb.io.fetch against a real HTTP server on 127.0.0.1.

No network mocks: each test talks to a threaded ``http.server`` on loopback (``allow_private=True``
where the fetch has to reach it). Addresses other than loopback are only ever *refused*; an autouse
guard wraps ``socket.socket.connect`` (delegating to the real one) and fails the test if anything
tries to connect to a non-loopback address, so "refused before connecting" is checked, not assumed.
"""

from __future__ import annotations

import ipaddress
import shutil
import socket
import ssl
import struct
import subprocess
import time
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from imgdb.errors import FetchError, ImgdbError
from imgdb.io import fetch as fetch_mod
from imgdb.io.fetch import FetchLimits, check_address, fetch_url, is_url
from tests.routes import Server, redirect_to, send


def _png_1x1() -> bytes:
    """A valid 1x1 RGB PNG, built here so the test has no binary fixture."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00\xff\x00\x00")
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


PNG = _png_1x1()
LOCAL = FetchLimits(allow_private=True, connect_timeout=2.0, read_timeout=2.0, total_timeout=4.0)


# --------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(autouse=True)
def connections(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every outgoing TCP connect; refuse (fail the test) any non-loopback destination."""
    seen: list[str] = []
    real_connect = socket.socket.connect

    def guarded(self: socket.socket, address: object) -> None:
        host = address[0] if isinstance(address, tuple) else str(address)
        seen.append(host)
        if isinstance(address, tuple) and not ipaddress.ip_address(host.split("%")[0]).is_loopback:
            raise AssertionError(f"test tried to connect to non-loopback address {host}")
        real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    return seen


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
    try:
        yield srv
    finally:
        srv.close()


def png_route(h: BaseHTTPRequestHandler) -> None:
    send(h, 200, {"Content-Type": "image/png"}, PNG)


def assert_one_line(exc: pytest.ExceptionInfo[FetchError]) -> str:
    message = str(exc.value)
    assert "\n" not in message and "\r" not in message
    assert isinstance(exc.value, ImgdbError)
    return message


# --------------------------------------------------------------------------------------------------
# Success, scheme, is_url


def test_fetches_png_bytes_and_sends_headers(server: Server) -> None:
    server.routes["/x.png"] = png_route
    assert fetch_url(server.url("/x.png?size=1"), LOCAL) == PNG
    path, headers = server.requests[0]
    assert path == "/x.png?size=1"
    assert headers["User-Agent"].startswith("imgdb/")
    assert headers["Host"] == f"127.0.0.1:{server.port}"  # the original authority, not rewritten


@pytest.mark.parametrize(
    "content_type", [None, "image/png", "image/jpeg; charset=binary", "application/octet-stream",
                     "binary/octet-stream"]
)
def test_image_like_content_types_are_accepted(server: Server, content_type: str | None) -> None:
    headers = {} if content_type is None else {"Content-Type": content_type}
    server.routes["/img"] = lambda h: send(h, 200, headers, PNG)
    assert fetch_url(server.url("/img"), LOCAL) == PNG


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/x.jpg", "gopher://x/",
                                 "javascript:alert(1)", "/local/path.png"])
def test_unsupported_schemes_are_refused(url: str, connections: list[str]) -> None:
    with pytest.raises(FetchError) as exc:
        fetch_url(url, LOCAL)
    assert "unsupported URL scheme" in assert_one_line(exc)
    assert connections == []


def test_is_url() -> None:
    assert is_url("http://example.com/a.jpg")
    assert is_url("HTTPS://EXAMPLE.COM/a.jpg")
    assert is_url("Http://x")
    assert not is_url("ftp://example.com/a.jpg")
    assert not is_url("file:///tmp/a.jpg")
    assert not is_url("/tmp/http://a.jpg")
    assert not is_url("http:/a.jpg")
    assert not is_url("")


def test_credentials_in_url_are_refused_and_not_echoed(server: Server) -> None:
    with pytest.raises(FetchError) as exc:
        fetch_url(f"http://user:s3cret@127.0.0.1:{server.port}/x.png", LOCAL)
    message = assert_one_line(exc)
    assert "credentials" in message and "s3cret" not in message


# --------------------------------------------------------------------------------------------------
# Address policy


@pytest.mark.parametrize(
    "ip",
    [
        "127.0.0.1", "127.8.9.10", "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254",
        "0.0.0.0", "224.0.0.1", "240.0.0.1", "255.255.255.255", "100.64.0.1",
        "::1", "::", "fe80::1", "fc00::1", "fd12:3456::1", "ff02::1",
        "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254",
        "2002:a00:1::1",  # 6to4 carrying 10.0.0.1
        "64:ff9b::a9fe:a9fe",  # NAT64 carrying 169.254.169.254
    ],
)
def test_check_address_refuses_non_public(ip: str) -> None:
    reason = check_address(ip, allow_private=False)
    assert reason is not None and "address" in reason
    assert check_address(ip, allow_private=True) is None


@pytest.mark.parametrize(
    "ip", ["8.8.8.8", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8", "2002:808:808::1"]
)
def test_check_address_allows_public(ip: str) -> None:
    assert check_address(ip, allow_private=False) is None
    assert check_address(ipaddress.ip_address(ip), allow_private=False) is None


def test_loopback_refused_with_default_limits(server: Server, connections: list[str]) -> None:
    server.routes["/x.png"] = png_route
    with pytest.raises(FetchError) as exc:
        fetch_url(server.url("/x.png"))
    message = assert_one_line(exc)
    assert "loopback" in message and server.url("/x.png") in message
    assert connections == [] and server.requests == []


def test_localhost_name_refused_after_resolution(server: Server, connections: list[str]) -> None:
    """The check applies to what the name resolves to, not to how the URL spells the host."""
    with pytest.raises(FetchError) as exc:
        fetch_url(f"http://localhost:{server.port}/x.png")
    assert "loopback" in assert_one_line(exc)
    assert connections == []


@pytest.mark.parametrize(
    "url",
    ["http://10.0.0.1/x.jpg", "http://169.254.169.254/latest/meta-data/", "https://192.168.0.1/a.png",
     "http://[::ffff:10.0.0.1]/x.jpg", "http://[fe80::1]/x.jpg", "http://0x7f000001/x.jpg"],
)
def test_private_literals_refused_without_connecting(url: str, connections: list[str]) -> None:
    started = time.monotonic()
    with pytest.raises(FetchError) as exc:
        fetch_url(url)
    message = assert_one_line(exc)
    assert "refusing" in message and "address" in message
    assert time.monotonic() - started < 0.5
    assert connections == []  # refused at the address check, not by a failed connect


def test_unresolvable_host() -> None:
    with pytest.raises(FetchError) as exc:
        fetch_url("http://does-not-exist.invalid/x.jpg", FetchLimits(connect_timeout=2.0))
    message = assert_one_line(exc)
    assert "cannot resolve host" in message and "does-not-exist.invalid" in message


# --------------------------------------------------------------------------------------------------
# Redirects


def test_redirect_to_other_loopback_url_followed_when_allowed(server: Server) -> None:
    other = Server()
    try:
        other.routes["/final.png"] = png_route
        server.routes["/start"] = redirect_to(other.url("/final.png"), 301)
        server.routes["/relative"] = redirect_to("/x.png", 307)
        server.routes["/x.png"] = png_route
        assert fetch_url(server.url("/start"), LOCAL) == PNG
        assert fetch_url(server.url("/relative"), LOCAL) == PNG
        assert [p for p, _ in other.requests] == ["/final.png"]
    finally:
        other.close()


def test_too_many_redirects(server: Server) -> None:
    server.routes["/loop"] = redirect_to("/loop")
    with pytest.raises(FetchError) as exc:
        fetch_url(server.url("/loop"), FetchLimits(allow_private=True, max_redirects=2))
    assert "too many redirects" in assert_one_line(exc)
    assert len(server.requests) == 3  # the first request and two followed redirects


def test_redirect_to_file_scheme_refused(server: Server) -> None:
    server.routes["/start"] = redirect_to("file:///etc/passwd")
    with pytest.raises(FetchError) as exc:
        fetch_url(server.url("/start"), LOCAL)
    assert "unsupported URL scheme 'file'" in assert_one_line(exc)


@pytest.mark.parametrize(
    "location",
    ["http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/x.jpg",
     "http://[::ffff:192.168.1.1]:8080/x.jpg"],
)
def test_redirect_target_address_is_rechecked(
    server: Server, connections: list[str], monkeypatch: pytest.MonkeyPatch, location: str
) -> None:
    """A redirect from a permitted host to a private address is refused with allow_private=False.

    The only server a test may run is on loopback, which the default policy refuses at hop one.
    Rather than add a test-only knob to FetchLimits, the test narrows the exemption to exactly
    what it needs: check_address (the real policy, called by the redirect loop for every hop) is
    wrapped to also admit 127.0.0.1 and delegates everything else unchanged. So hop one reaches
    the local server, and hop two meets the unmodified default policy and must be refused before
    any connection is made (the connect guard would fail the test otherwise).
    """
    real_check = fetch_mod.check_address

    def admit_test_server(ip: object, allow_private: bool) -> str | None:
        if str(ip) == "127.0.0.1":
            return None
        return real_check(ip, allow_private)  # type: ignore[arg-type]

    monkeypatch.setattr(fetch_mod, "check_address", admit_test_server)
    server.routes["/x.png"] = png_route
    server.routes["/start"] = redirect_to(location)
    no_private = FetchLimits(allow_private=False, read_timeout=2.0, total_timeout=4.0)
    assert fetch_url(server.url("/x.png"), no_private) == PNG  # hop one alone is admitted

    with pytest.raises(FetchError) as exc:
        fetch_url(server.url("/start"), no_private)
    message = assert_one_line(exc)
    assert "refusing" in message and location in message
    assert {c for c in connections} == {"127.0.0.1"}


# --------------------------------------------------------------------------------------------------
# Status, content type, size


def test_http_error_status(server: Server) -> None:
    with pytest.raises(FetchError) as exc:
        fetch_url(server.url("/missing.png"), LOCAL)
    message = assert_one_line(exc)
    assert "HTTP 404" in message and server.url("/missing.png") in message


@pytest.mark.parametrize("content_type", ["text/html; charset=utf-8", "application/json",
                                          "application/problem+json", "video/mp4"])
def test_non_image_content_type_refused(server: Server, content_type: str) -> None:
    server.routes["/page"] = lambda h: send(h, 200, {"Content-Type": content_type}, b"<html></html>")
    with pytest.raises(FetchError) as exc:
        fetch_url(server.url("/page"), LOCAL)
    message = assert_one_line(exc)
    assert f"not an image: content-type {content_type.split(';')[0]}" in message


def test_declared_oversize_refused_before_reading(server: Server) -> None:
    """Content-Length above the limit is refused at once: the server never sends the body."""

    def huge(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "image/jpeg")
        h.send_header("Content-Length", str(10**12))
        h.end_headers()
        h.wfile.flush()
        server.stop.wait(5)  # a read of the body would time out; refusing must not

    server.routes["/huge"] = huge
    started = time.monotonic()
    with pytest.raises(FetchError) as exc:
        fetch_url(server.url("/huge"), FetchLimits(allow_private=True, max_bytes=1000))
    message = assert_one_line(exc)
    assert "Content-Length" in message and "1000" in message
    assert time.monotonic() - started < 1.0


def test_chunked_oversize_refused(server: Server) -> None:
    def chunked(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "image/png")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        for _ in range(3):
            h.wfile.write(b"64\r\n" + b"x" * 100 + b"\r\n")
        h.wfile.write(b"0\r\n\r\n")

    server.routes["/chunked"] = chunked
    with pytest.raises(FetchError) as exc:
        fetch_url(server.url("/chunked"), FetchLimits(allow_private=True, max_bytes=250))
    assert "exceeds the limit of 250 bytes" in assert_one_line(exc)
    assert fetch_url(server.url("/chunked"), FetchLimits(allow_private=True, max_bytes=300)) == (
        b"x" * 300
    )


def test_endless_body_without_length_is_cut_off(server: Server) -> None:
    """No Content-Length and a body that never ends: reading stops just past max_bytes."""

    def endless(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "application/octet-stream")
        h.end_headers()
        try:
            while not server.stop.is_set():
                h.wfile.write(b"\0" * 65536)
        except OSError:
            pass  # the client hung up, as it should

    server.routes["/endless"] = endless
    with pytest.raises(FetchError) as exc:
        fetch_url(server.url("/endless"), FetchLimits(allow_private=True, max_bytes=100_000))
    assert "exceeds the limit of 100000 bytes" in assert_one_line(exc)


def test_body_exactly_at_limit_is_accepted(server: Server) -> None:
    server.routes["/x.png"] = lambda h: send(h, 200, {"Content-Type": "image/png"}, PNG,
                                             content_length=False)
    assert fetch_url(server.url("/x.png"), FetchLimits(allow_private=True, max_bytes=len(PNG))) == PNG


def test_truncated_body_refused(server: Server) -> None:
    def short(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "image/png")
        h.send_header("Content-Length", "1000")
        h.end_headers()
        h.wfile.write(PNG)

    server.routes["/short"] = short
    with pytest.raises(FetchError) as exc:
        fetch_url(server.url("/short"), LOCAL)
    assert "truncated" in assert_one_line(exc)


# --------------------------------------------------------------------------------------------------
# Time-outs and connection failures


def test_stalled_server_times_out_per_read(server: Server) -> None:
    server.routes["/stall"] = lambda h: server.stop.wait(5)
    started = time.monotonic()
    with pytest.raises(FetchError) as exc:
        fetch_url(server.url("/stall"), FetchLimits(allow_private=True, read_timeout=0.3))
    message = assert_one_line(exc)
    assert "timed out fetching" in message and "after 0.3 s" in message
    assert server.url("/stall") in message
    assert time.monotonic() - started < 1.5


def test_trickling_server_hits_total_deadline(server: Server) -> None:
    """One header byte every 0.1 s never trips a 0.5 s read timeout; the total deadline ends it."""

    def trickle(h: BaseHTTPRequestHandler) -> None:
        h.wfile.write(b"HTTP/1.1 200 OK\r\n")
        h.wfile.flush()
        try:
            while not server.stop.wait(0.1):
                h.wfile.write(b"X")
                h.wfile.flush()
        except OSError:
            pass

    server.routes["/trickle"] = trickle
    started = time.monotonic()
    with pytest.raises(FetchError) as exc:
        fetch_url(server.url("/trickle"),
                  FetchLimits(allow_private=True, read_timeout=0.5, total_timeout=0.8))
    message = assert_one_line(exc)
    assert "after 0.8 s" in message and "total" in message
    assert 0.7 < time.monotonic() - started < 1.6


def test_connection_refused_is_one_line() -> None:
    with socket.socket() as probe:  # a port nobody listens on: bind, note it, close
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(FetchError) as exc:
        fetch_url(f"http://127.0.0.1:{port}/x.png", LOCAL)
    assert "connection refused" in assert_one_line(exc)


def test_https_to_plain_http_server_is_a_tls_error(server: Server) -> None:
    with pytest.raises(FetchError) as exc:
        fetch_url(server.url("/x.png", scheme="https"), LOCAL)
    assert "TLS" in assert_one_line(exc)


@pytest.fixture(scope="module")
def self_signed_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl command not available to make a test certificate")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=30,
    )
    return cert, key


def test_https_certificate_is_verified(self_signed_cert: tuple[Path, Path]) -> None:
    """Pinning the resolved IP must not switch certificate checking off."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*self_signed_cert)
    tls = Server(ssl_context=context)
    try:
        tls.routes["/x.png"] = png_route
        with pytest.raises(FetchError) as exc:
            fetch_url(tls.url("/x.png", scheme="https"), LOCAL)
        assert "certificate verification failed" in assert_one_line(exc)
        assert tls.requests == []
    finally:
        tls.close()


# --------------------------------------------------------------------------------------------------
# Messages


def test_long_urls_are_truncated_in_messages(server: Server) -> None:
    url = server.url("/" + "a" * 5000)
    with pytest.raises(FetchError) as exc:
        fetch_url(url, LOCAL)
    message = assert_one_line(exc)
    assert "HTTP 404" in message and "..." in message and len(message) < 400


def test_invalid_port_is_a_fetch_error() -> None:
    with pytest.raises(FetchError) as exc:
        fetch_url("http://127.0.0.1:99999/x.png", LOCAL)
    assert "invalid URL" in assert_one_line(exc)
