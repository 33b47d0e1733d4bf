"""Safe fetching of image URLs for queries and ingest.

A URL handed to imgdb (by the CLI, and later by the HTTP server on behalf of a remote user) makes
this process open a connection somewhere. Fetching naively would let that user reach things only
this machine can reach (cloud metadata at 169.254.169.254, the database port on 127.0.0.1, the
intranet), tie a worker up forever with a slow server, or fill memory with an endless body. So:

* only ``http`` and ``https``;
* the host is resolved **once**, every resolved address is checked (:func:`check_address`), and the
  connection goes to exactly that checked address with the original ``Host`` header. A second DNS
  lookup at connect time would let a hostile name server answer "public" to the check and
  "127.0.0.1" to the connect (DNS rebinding). For https the certificate is still verified against
  the *name*, so pinning the IP does not weaken TLS;
* redirects are followed by hand, and every hop goes through the same scheme and address checks
  (a public URL may redirect to ``http://169.254.169.254/``);
* the body is capped at ``max_bytes`` (declared ``Content-Length`` is refused before reading; the
  read stops at ``max_bytes + 1``), and an obviously non-image ``Content-Type`` is refused early;
* time is bounded three ways: connect, each socket read, and a total deadline over the whole fetch
  (DNS, redirects, headers and body), so a server trickling one byte per read cannot hold us.

Everything that goes wrong becomes a one-line :class:`~imgdb.errors.FetchError` naming the URL.
Only the standard library is used.
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Union

from imgdb.errors import FetchError

__all__ = ["FetchLimits", "fetch_url", "is_url", "check_address", "USER_AGENT"]

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


def _version() -> str:
    try:
        from importlib.metadata import version

        return ".".join(version("imgdb").split(".")[:2])
    except Exception:  # not installed (plain checkout on PYTHONPATH): any stable string will do
        return "0.1"


USER_AGENT = f"imgdb/{_version()}"

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_DEFAULT_PORTS = {"http": 80, "https": 443}
_READ_CHUNK = 64 * 1024
_MAX_SHOWN_URL = 200

# Networks that embed an IPv4 address in an IPv6 one and can route to it (NAT64 well-known prefix
# and the local-use prefix). IPv4-mapped, 6to4 and Teredo have their own ipaddress accessors.
_NAT64_NETWORKS = (
    ipaddress.IPv6Network("64:ff9b::/96"),
    ipaddress.IPv6Network("64:ff9b:1::/48"),
)

# Content types that are certainly not an image. Anything else (image/*, */octet-stream, missing,
# or a vendor type some servers use for downloads) is let through: the decoder is the real judge,
# this check only saves downloading an HTML error page or a JSON answer to then fail on it.
_NON_IMAGE_TOP_LEVEL = frozenset({"text", "audio", "video", "font", "model", "multipart", "message"})
_NON_IMAGE_APPLICATION = frozenset(
    {
        "json",
        "xml",
        "xhtml+xml",
        "javascript",
        "x-javascript",
        "ecmascript",
        "pdf",
        "zip",
        "gzip",
        "x-gzip",
        "x-tar",
        "x-www-form-urlencoded",
        "msword",
        "rtf",
        "x-sh",
    }
)


@dataclass(frozen=True)
class FetchLimits:
    """Bounds on one :func:`fetch_url` call.

    ``read_timeout`` applies to each socket read (and send), ``total_timeout`` to the whole fetch
    including DNS, redirects and the body: a per-read limit alone does not stop a server that sends
    one byte just before every read would time out.

    ``allow_private`` lets the fetch reach loopback, private, link-local, reserved... addresses.
    It is off by default because the fetch may run on behalf of someone who must not see this
    machine's network; turn it on for tests and trusted intranets.
    """

    max_bytes: int = 20 * 1024 * 1024
    connect_timeout: float = 5.0
    read_timeout: float = 10.0
    total_timeout: float = 30.0
    max_redirects: int = 5
    allow_private: bool = False


def is_url(text: str) -> bool:
    """True when ``text`` is meant as a URL (``http://`` or ``https://``, any case), not a path.

    Deliberately no stripping or guessing: a local file named ``http:foo`` stays a file.
    """
    head = text[:8].lower()
    return head.startswith("http://") or head.startswith("https://")


# --------------------------------------------------------------------------------------------------
# Messages


def _show(url: str) -> str:
    """The URL as it may appear in a one-line message: no credentials, no control characters, short."""
    try:
        parts = urllib.parse.urlsplit(url)
        if "@" in parts.netloc:
            url = urllib.parse.urlunsplit(
                parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2])
            )
    except ValueError:
        pass
    url = "".join(c if c.isprintable() else "?" for c in url)
    if len(url) > _MAX_SHOWN_URL:
        url = url[: _MAX_SHOWN_URL - 3] + "..."
    return url


def _one_line(text: object, limit: int = 200) -> str:
    """Server- or OS-supplied text squeezed onto one short line."""
    s = " ".join("".join(c if c.isprintable() else " " for c in str(text)).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _os_reason(exc: BaseException) -> str:
    """A short human reason for a socket/ssl error (``connection refused``, not ``[Errno 111] ...``)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "TLS certificate verification failed: " + _one_line(
            exc.verify_message or exc.reason or exc
        )
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason.replace("_", " ").lower() if exc.reason else exc
        return "TLS error: " + _one_line(reason)
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset by server"
    if isinstance(exc, OSError) and exc.strerror:
        return _one_line(exc.strerror).lower()
    return _one_line(exc) or type(exc).__name__


def _fmt_seconds(s: float) -> str:
    return f"{s:g}"


# --------------------------------------------------------------------------------------------------
# Address policy


def _address_category(ip: IPAddress) -> str | None:
    """Why ``ip`` is not a public internet address, or None when it is."""
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip.is_private:
        return "private"
    if ip.is_reserved:
        return "reserved"
    if not ip.is_global:  # e.g. 100.64.0.0/10 (carrier-grade NAT), which is neither of the above
        return "non-global"
    return None


def _embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address routes to, if it is a translation/tunnel form of one."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]  # (server, client): the client is where traffic ends up
    for net in _NAT64_NETWORKS:
        if ip in net:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def check_address(ip: str | IPAddress, allow_private: bool) -> str | None:
    """The reason ``ip`` must not be connected to, or None when it may be.

    Refused (unless ``allow_private``): unspecified, loopback, link-local, multicast, private,
    reserved and other non-global addresses, including IPv6 forms that carry such an IPv4 address
    (IPv4-mapped ``::ffff:10.0.0.1``, 6to4, Teredo, NAT64), since the kernel or a gateway would
    deliver those to the IPv4 target. This is a pure function so that the policy can be tested on
    its own and the redirect loop can apply it to every hop.
    """
    if allow_private:
        return None
    if isinstance(ip, str):
        ip = ipaddress.ip_address(ip)
    ip = ipaddress.ip_address(ip.compressed.split("%", 1)[0])  # drop any IPv6 scope id
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        # ::ffff:a.b.c.d *is* a.b.c.d to the kernel: judge the IPv4 address alone (ipaddress
        # files the whole ::ffff:0:0/96 block under private/reserved, which would also refuse
        # ::ffff:8.8.8.8).
        inner_v4 = ip.ipv4_mapped
        category = _address_category(inner_v4)
        return None if category is None else f"{category} address {inner_v4} (as {ip})"
    category = _address_category(ip)
    if category is None:
        inner = _embedded_ipv4(ip)
        if inner is not None:
            inner_category = _address_category(inner)
            if inner_category is not None:
                return f"address {ip} (carries {inner_category} address {inner})"
    if category is None:
        return None
    return f"{category} address {ip}"


# --------------------------------------------------------------------------------------------------
# One hop


@dataclass(frozen=True)
class _Target:
    url: str
    scheme: str
    host: str  # ASCII (IDNA) form, no brackets
    port: int
    request_target: str  # path?query, percent-encoded ASCII

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.port != _DEFAULT_PORTS[self.scheme]:
            host = f"{host}:{self.port}"
        return host


class _Deadline:
    """The total time budget of one fetch, shared by every hop."""

    def __init__(self, total: float) -> None:
        self.total = total
        self.end = time.monotonic() + total

    def remaining(self) -> float:
        return self.end - time.monotonic()

    def cap(self, limit: float) -> tuple[float, bool]:
        """``(timeout, total_binds)``: the time to allow an operation limited by ``limit``."""
        left = self.remaining()
        if left <= 0:
            raise _TotalTimeout()
        return (left, True) if left <= limit else (limit, False)


class _TotalTimeout(Exception):
    """The total deadline passed (internal; turned into a FetchError by fetch_url)."""


class _HopTimeout(Exception):
    """A connect/read/DNS time-out (internal); ``seconds`` is the limit that was exceeded."""

    def __init__(self, seconds: float, what: str) -> None:
        super().__init__(what)
        self.seconds = seconds
        self.what = what


def _parse(url: str) -> _Target:
    """Split and validate a URL (scheme, host, port), or raise FetchError."""
    shown = _show(url)
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise FetchError(f"invalid URL {shown}: {_one_line(exc)}") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise FetchError(
            f"unsupported URL scheme {scheme or '(none)'!r} in {shown} (only http and https)"
        )
    if parts.username is not None or parts.password is not None:
        # Credentials would be sent to (and logged by) whatever a redirect points at.
        raise FetchError(f"credentials in URLs are not supported: {shown}")
    host = parts.hostname
    if not host:
        raise FetchError(f"invalid URL {shown}: no host")
    if port is None:
        port = _DEFAULT_PORTS[scheme]
    if port == 0:
        raise FetchError(f"invalid URL {shown}: port 0")
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise FetchError(f"invalid host name in {shown}") from None
    # Percent-encode anything that is not legal on the request line (spaces, non-ASCII), keeping
    # what is already encoded: http.client would otherwise refuse or mangle it.
    path = urllib.parse.quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
    query = urllib.parse.quote(parts.query, safe="/%:@!$&'()*+,;=-._~?")
    request_target = path + ("?" + query if query else "")
    if not request_target.startswith("/"):
        request_target = "/" + request_target
    return _Target(url, scheme, host, port, request_target)


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _getaddrinfo(target: _Target, deadline: _Deadline, limits: FetchLimits) -> list[tuple]:
    """Resolve the host once, within the connect/total time budget.

    ``getaddrinfo`` has no timeout of its own and a broken resolver can block for tens of seconds,
    so a host name is looked up in a daemon thread we stop waiting for. IP literals are resolved
    numerically in place (no DNS at all).
    """
    shown = _show(target.url)
    if _is_ip_literal(target.host):
        try:
            return socket.getaddrinfo(
                target.host, target.port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST
            )
        except socket.gaierror as exc:
            raise FetchError(f"cannot resolve host in {shown}: {_one_line(exc.strerror)}") from None

    result: list = []
    error: list[BaseException] = []

    def lookup() -> None:
        try:
            result.extend(socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM))
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            error.append(exc)

    wait, _ = deadline.cap(limits.connect_timeout)
    worker = threading.Thread(target=lookup, name="imgdb-fetch-dns", daemon=True)
    worker.start()
    worker.join(wait)
    if worker.is_alive():
        raise FetchError(
            f"cannot resolve host {target.host!r} for {shown}: "
            f"timed out after {_fmt_seconds(wait)} s"
        )
    if error:
        exc = error[0]
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise FetchError(
            f"cannot resolve host {target.host!r} for {shown}: {_one_line(reason).lower()}"
        )
    if not result:
        raise FetchError(f"cannot resolve host {target.host!r} for {shown}: no addresses")
    return result


def _resolve_checked(target: _Target, deadline: _Deadline, limits: FetchLimits) -> list[tuple]:
    """Resolve once and refuse the URL if *any* address is refused by :func:`check_address`.

    Any, not all: a name that resolves to one public and one private address could otherwise be
    steered to the private one by a failed first connect.
    """
    infos = _getaddrinfo(target, deadline, limits)
    for family, _type, _proto, _canon, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            raise FetchError(f"refusing {_show(target.url)}: unexpected address family {family}")
        reason = check_address(sockaddr[0], limits.allow_private)
        if reason is not None:
            where = reason if _is_ip_literal(target.host) else f"{target.host} resolves to {reason}"
            raise FetchError(
                f"refusing {_show(target.url)}: {where} (private and local addresses are not fetched)"
            )
    return infos


def _connect(infos: list[tuple], deadline: _Deadline, limits: FetchLimits) -> socket.socket:
    """Connect to the first reachable address among the already-checked ``infos`` (no new lookup)."""
    last: BaseException | None = None
    for family, type_, proto, _canon, sockaddr in infos:
        timeout, total_binds = deadline.cap(limits.connect_timeout)
        sock = socket.socket(family, type_, proto)
        try:
            sock.settimeout(timeout)
            sock.connect(sockaddr)
            return sock
        except socket.timeout:
            sock.close()
            if total_binds:
                raise _TotalTimeout() from None
            last = _HopTimeout(limits.connect_timeout, "connect")
        except OSError as exc:
            sock.close()
            last = exc
    assert last is not None
    raise last


class _DeadlineSocket:
    """What http.client sees as the socket: every send and recv is bounded by the per-read limit
    *and* what is left of the total deadline.

    ``http.client`` reads headers line by line through a buffered file; wrapping the raw reads
    (rather than setting one timeout up front) is what makes the total deadline hold while headers
    trickle in.
    """

    def __init__(self, sock: socket.socket, deadline: _Deadline, read_timeout: float) -> None:
        self._sock = sock
        self._deadline = deadline
        self._read_timeout = read_timeout

    def _arm(self) -> bool:
        timeout, total_binds = self._deadline.cap(self._read_timeout)
        self._sock.settimeout(timeout)
        return total_binds

    def _timed_out(self, total_binds: bool) -> Exception:
        return _TotalTimeout() if total_binds else _HopTimeout(self._read_timeout, "read")

    def sendall(self, data: bytes) -> None:
        total_binds = self._arm()
        try:
            self._sock.sendall(data)
        except socket.timeout:
            raise self._timed_out(total_binds) from None

    def recv_into(self, buffer: memoryview | bytearray, nbytes: int = 0) -> int:
        total_binds = self._arm()
        try:
            return self._sock.recv_into(buffer, nbytes)
        except socket.timeout:
            raise self._timed_out(total_binds) from None

    def makefile(self, mode: str = "rb", *args: object, **kwargs: object) -> io.BufferedReader:
        if mode != "rb":  # http.client only ever asks for "rb"
            raise ValueError(f"unsupported mode {mode!r}")
        return io.BufferedReader(_DeadlineRawIO(self))

    def close(self) -> None:
        """Ignored: http.client closes "the socket" as soon as it has the response headers of a
        ``Connection: close`` response, while the body is still to be read through makefile().
        The real socket is closed by :func:`_fetch_hop` when it is done with it."""


class _DeadlineRawIO(io.RawIOBase):
    """Raw reader over a :class:`_DeadlineSocket` (a tiny socket.SocketIO)."""

    def __init__(self, sock: _DeadlineSocket) -> None:
        super().__init__()
        self._dsock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        return self._dsock.recv_into(buffer)


def _is_non_image(content_type: str) -> bool:
    """True for a Content-Type that is certainly not an image (see _NON_IMAGE_*)."""
    mime = content_type.split(";", 1)[0].strip().lower()
    if not mime:
        return False
    top, _, sub = mime.partition("/")
    if top == "image":
        return False
    if top in _NON_IMAGE_TOP_LEVEL:
        return True
    if top == "application":
        return sub in _NON_IMAGE_APPLICATION or sub.endswith(("+json", "+xml"))
    return False


def _fetch_hop(
    target: _Target, deadline: _Deadline, limits: FetchLimits
) -> tuple[str | None, bytes]:
    """Fetch one URL: ``(location, b"")`` for a redirect, ``(None, body)`` for the image."""
    shown = _show(target.url)
    infos = _resolve_checked(target, deadline, limits)
    raw = _connect(infos, deadline, limits)
    try:
        if target.scheme == "https":
            timeout, total_binds = deadline.cap(limits.read_timeout)
            raw.settimeout(timeout)  # bounds the whole handshake (CPython applies it as a deadline)
            context = ssl.create_default_context()
            try:
                raw = context.wrap_socket(raw, server_hostname=target.host)
            except socket.timeout:
                raise (
                    _TotalTimeout() if total_binds else _HopTimeout(limits.read_timeout, "read")
                ) from None
        sock = _DeadlineSocket(raw, deadline, limits.read_timeout)

        conn = http.client.HTTPConnection(target.host, target.port)
        conn.sock = sock  # type: ignore[assignment]  # already connected to the checked address
        conn.putrequest("GET", target.request_target, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", target.host_header)
        conn.putheader("User-Agent", USER_AGENT)
        conn.putheader("Accept", "image/*, application/octet-stream;q=0.9, */*;q=0.5")
        conn.putheader("Accept-Encoding", "identity")  # we do not decompress; sizes stay honest
        conn.putheader("Connection", "close")
        conn.endheaders()
        response = conn.getresponse()

        status = response.status
        if status in _REDIRECT_STATUSES:
            location = response.getheader("Location")
            if not location:
                raise FetchError(f"HTTP {status} redirect without Location fetching {shown}")
            return urllib.parse.urljoin(target.url, location.strip()), b""
        if not 200 <= status < 300:
            reason = _one_line(response.reason, 80)
            raise FetchError(f"HTTP {status}{' ' + reason if reason else ''} fetching {shown}")

        content_type = response.getheader("Content-Type") or ""
        if _is_non_image(content_type):
            raise FetchError(
                f"not an image: content-type {_one_line(content_type.split(';')[0].strip(), 80)}"
                f" at {shown}"
            )

        declared: int | None = None
        if response.getheader("Transfer-Encoding") is None:
            declared = response.length  # http.client's parse of Content-Length (None if absent)
            if declared is not None and declared > limits.max_bytes:
                raise FetchError(
                    f"refusing {shown}: Content-Length {declared} exceeds the limit of "
                    f"{limits.max_bytes} bytes"
                )

        body = bytearray()
        while True:
            chunk = response.read1(_READ_CHUNK)
            if not chunk:
                break
            body += chunk
            if len(body) > limits.max_bytes:
                raise FetchError(
                    f"refusing {shown}: body exceeds the limit of {limits.max_bytes} bytes"
                )
        if declared is not None and len(body) < declared:
            raise FetchError(
                f"truncated download from {shown}: got {len(body)} of {declared} bytes"
            )
        return None, bytes(body)
    finally:
        raw.close()


# --------------------------------------------------------------------------------------------------
# Public entry point


def fetch_url(url: str, limits: FetchLimits | None = None) -> bytes:
    """Download ``url`` (an image) under ``limits`` and return its bytes.

    Follows up to ``limits.max_redirects`` redirects, re-checking scheme and address at every hop.
    Raises :class:`~imgdb.errors.FetchError` (one line, naming the URL) for anything refused or
    failed: scheme, address, DNS, connection, TLS, time-out, HTTP status, size, content type.
    """
    limits = limits or FetchLimits()
    deadline = _Deadline(limits.total_timeout)
    current = url
    redirects = 0
    while True:
        target = _parse(current)
        try:
            location, body = _fetch_hop(target, deadline, limits)
        except FetchError:
            raise
        except _TotalTimeout:
            raise FetchError(
                f"timed out fetching {_show(current)} after {_fmt_seconds(limits.total_timeout)} s"
                " (total time limit)"
            ) from None
        except _HopTimeout as exc:
            raise FetchError(
                f"timed out fetching {_show(current)} after {_fmt_seconds(exc.seconds)} s"
                f" ({exc.what})"
            ) from None
        except http.client.HTTPException as exc:
            detail = _one_line(exc) or type(exc).__name__
            raise FetchError(f"bad HTTP response from {_show(current)}: {detail}") from None
        except (OSError, ValueError) as exc:
            raise FetchError(f"cannot fetch {_show(current)}: {_os_reason(exc)}") from None
        if location is None:
            return body
        redirects += 1
        if redirects > limits.max_redirects:
            raise FetchError(
                f"too many redirects (more than {limits.max_redirects}) fetching {_show(url)}"
            )
        current = location
