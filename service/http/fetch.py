"""Image URLs, fetched by an HTTP worker under guard (setting fetch_urls; docs/architecture.md, "Image URLs").

A URL is fetched only if its scheme is https (http too with fetch_allow_http), its host or prefix is on the
allow-list (fetch_allow), and every address its host resolves to may be reached: never a multicast, unspecified or
reserved address, and a loopback, private, link-local or other non-public one only with fetch_allow_private. The
worker resolves the host itself, checks the addresses and connects to a checked one (`PinnedBackend`), so no second
lookup (a DNS rebinding) can send the connection elsewhere; the URL keeps its host name, which gives the Host header,
TLS SNI and the certificate check. Redirects are followed by hand, at most MAX_REDIRECTS, each checked as a new URL.
The body is counted while it streams (at most max_upload_bytes, taken from the worker's byte budget), the whole fetch
has fetch_timeout_s, and at most fetch_max_concurrent fetches run at once in a worker. One kept httpx client pools the
connections (per host name: a pooled connection goes to an address checked for that name).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import httpcore
import httpx

from service.errors import ServiceError
from service.settings import Settings

from .uploads import Held

MAX_REDIRECTS = 3
MAX_URL_CHARS = 2048
REDIRECTS = frozenset({301, 302, 303, 307, 308})
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")  # "this host": Linux connects 0.0.0.0 to itself
NAT64 = ipaddress.ip_network("64:ff9b::/96")  # IPv4 addresses reached through a NAT64 gateway


def address_refusal(address: IPAddress, allow_private: bool = False) -> str | None:
    """Why a fetch may not connect to `address` (None: it may). IPv4 addresses inside IPv6 ones (mapped, NAT64,
    6to4) are judged as the IPv4 address they reach."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour or (
            ipaddress.IPv4Address(int(address) & 0xFFFFFFFF) if address in NAT64 else None)
        if embedded is not None:
            return address_refusal(embedded, allow_private)
    if address.is_multicast:
        return "multicast"
    if address.is_unspecified or address in THIS_NETWORK:
        return "unspecified"
    kind = ("loopback" if address.is_loopback else "link-local" if address.is_link_local else
            "reserved" if address.is_reserved else "private" if address.is_private else
            "non-public" if not address.is_global else None)
    if kind is None or (allow_private and kind != "reserved"):
        return None
    return kind


def not_allowed(detail: str) -> ServiceError:
    return ServiceError(403, "url_not_allowed", detail)


def invalid_url(detail: str) -> ServiceError:
    return ServiceError(422, "invalid_url", detail)


def fetch_failed(detail: str) -> ServiceError:
    return ServiceError(502, "fetch_failed", detail)


def default_port(url: httpx.URL) -> int:
    return url.port or (443 if url.scheme == "https" else 80)


class AllowList:
    """fetch_allow: `*` (any host), hosts (`images.example.com`, `*.example.com` for its subdomains, `host:port`)
    and URL prefixes (`https://cdn.example.com/images/`: same scheme, host and port, the path under it)."""

    def __init__(self, spec: str):
        entries = [e.strip() for e in spec.split(",") if e.strip()]
        self.any_host = "*" in entries
        self.suffixes = tuple(e[1:].lower() for e in entries if e.startswith("*."))
        self.hosts: set[tuple[str, int | None]] = set()
        self.prefixes: list[tuple[str, str, int, str]] = []
        for entry in entries:
            if entry == "*" or entry.startswith("*."):
                continue
            try:
                if "://" in entry:
                    url = httpx.URL(entry)
                    self.prefixes.append((url.scheme, url.host, default_port(url), url.path))
                else:
                    self.hosts.add(host_and_port(entry))
            except (httpx.InvalidURL, ValueError) as e:
                raise ValueError(f"fetch_allow: cannot read {entry!r}: {e}") from None

    def allows(self, url: httpx.URL) -> bool:
        host = url.host
        if self.any_host or host.endswith(self.suffixes) or (host, None) in self.hosts \
                or (host, default_port(url)) in self.hosts:
            return True
        port, path = default_port(url), url.path
        return any(scheme == url.scheme and host == prefix_host and port == prefix_port
                   and (path.startswith(prefix) if prefix.endswith("/") else
                        path == prefix or path.startswith(f"{prefix}/"))
                   for scheme, prefix_host, prefix_port, prefix in self.prefixes)


def host_and_port(entry: str) -> tuple[str, int | None]:
    """`host`, `host:port`, `[v6]` or `[v6]:port` as (the host as httpx.URL gives it, the port or None)."""
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else None
    else:
        host, _, port = entry.partition(":") if entry.count(":") == 1 else (entry, "", None)
    normal = httpx.URL(f"http://[{host}]/" if ":" in host else f"http://{host}/").host
    return normal, int(port) if port else None


def parse_ip(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


async def resolve(host: str, port: int, allow_private: bool) -> list[str]:
    """Every address `host` resolves to, checked (403 if any of them may not be reached); no connection is made."""
    literal = parse_ip(host)
    if literal is not None:
        addresses = [host]
    else:
        try:
            infos = await asyncio.get_running_loop().run_in_executor(
                None, lambda: socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except (socket.gaierror, UnicodeError) as e:
            raise fetch_failed(f"cannot resolve the image URL's host {host!r}: {e}") from None
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    for address in addresses:
        ip = parse_ip(address)
        reason = "unreadable" if ip is None else address_refusal(ip, allow_private)
        if reason is not None:
            shown = host if literal is not None else f"{host} (it resolves to {address})"
            article = "an" if reason[0] in "aeiu" else "a"
            raise not_allowed(f"the image URL's host {shown} is {article} {reason} address, which is not fetched"
                              + ("" if allow_private or reason in ("multicast", "unspecified", "reserved") else
                                 " (fetch_allow_private)"))
    return addresses


class PinnedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend that resolves a host itself, checks every address (`resolve`) and connects to a
    checked one: the connection cannot go to an address a second lookup would give."""

    def __init__(self, allow_private: bool):
        self.allow_private = allow_private
        self.inner = httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                          socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        error: Exception | None = None
        for address in await resolve(host, port, self.allow_private):
            try:
                return await self.inner.connect_tcp(address, port, timeout, local_address, socket_options)
            except httpcore.ConnectError as e:  # the next address of the host, as a browser would
                error = e
        assert error is not None
        raise error

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("image URLs are fetched over TCP only")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


class PinnedTransport(httpx.AsyncBaseTransport):
    """httpx's transport over an httpcore pool that connects through `PinnedBackend` (httpx's own transport takes no
    network backend). httpcore's errors come out as httpx's."""

    def __init__(self, allow_private: bool, max_connections: int):
        self.pool = httpcore.AsyncConnectionPool(ssl_context=httpx.create_ssl_context(), http1=True, http2=False,
                                                 max_connections=max_connections, keepalive_expiry=30.0,
                                                 network_backend=PinnedBackend(allow_private))

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        core = httpcore.Request(method=request.method, url=httpcore.URL(
            scheme=request.url.raw_scheme, host=request.url.raw_host, port=request.url.port,
            target=request.url.raw_path), headers=request.headers.raw, content=request.stream,
            extensions=request.extensions)
        with httpx_errors():
            response = await self.pool.handle_async_request(core)
        return httpx.Response(status_code=response.status, headers=response.headers,
                              stream=ResponseStream(response.stream), extensions=response.extensions)

    async def aclose(self) -> None:
        await self.pool.aclose()


class ResponseStream(httpx.AsyncByteStream):
    def __init__(self, stream: Any):
        self.stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with httpx_errors():
            async for part in self.stream:
                yield part

    async def aclose(self) -> None:
        await self.stream.aclose()


@contextmanager
def httpx_errors() -> Iterator[None]:
    """httpcore's exceptions raised as httpx's: timeouts as httpx.TimeoutException, the others as TransportError."""
    try:
        yield
    except httpcore.TimeoutException as e:
        raise httpx.TimeoutException(str(e) or type(e).__name__) from e
    except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol) as e:
        raise httpx.TransportError(str(e) or type(e).__name__) from e


class Fetcher:
    """One worker's guarded fetcher of image URLs (see the module's docstring); `close` at the end."""

    def __init__(self, settings: Settings):
        self.allow = AllowList(settings.fetch_allow)
        self.allow_http = settings.fetch_allow_http
        self.max_bytes = settings.max_upload_bytes
        self.timeout_s = settings.fetch_timeout_s
        self.slots = asyncio.Semaphore(settings.fetch_max_concurrent)
        self.client = httpx.AsyncClient(
            transport=PinnedTransport(settings.fetch_allow_private, settings.fetch_max_concurrent),
            timeout=httpx.Timeout(settings.fetch_timeout_s), follow_redirects=False, trust_env=False,
            headers={"user-agent": "mmap-serve", "accept": "image/*", "accept-encoding": "identity"})

    async def close(self) -> None:
        await self.client.aclose()

    def checked(self, text: str) -> httpx.URL:
        """The URL, if it may be fetched by its scheme, form and host (422 `invalid_url`, 403 `url_not_allowed`);
        its addresses are checked when it is connected to."""
        if len(text) > MAX_URL_CHARS:
            raise invalid_url(f"an image URL may have {MAX_URL_CHARS} characters, not {len(text)}")
        try:
            url = httpx.URL(text)
        except httpx.InvalidURL as e:
            raise invalid_url(f"not a URL: {e}") from None
        if url.scheme not in ("https", "http") or not url.host:
            raise invalid_url(f"image URLs are https://host/... (http too where allowed), not {text[:100]!r}")
        if url.userinfo:
            raise invalid_url("image URLs with credentials (user:password@) are not fetched")
        if any(part in (".", "..") for part in url.path.split("/")):
            raise invalid_url("an image URL's path may not hold '.' or '..' segments")
        if url.scheme == "http" and not self.allow_http:
            raise not_allowed(f"http URLs are not fetched (fetch_allow_http): {text[:100]!r}; use https")
        if not self.allow.allows(url):
            raise not_allowed(f"the image URL {text[:100]!r} names a host (or path) this service does not fetch "
                              "from (fetch_allow)")
        return url

    async def fetch(self, text: str, held: Held) -> bytes:
        """The body of the image URL `text`, fetched under every guard; ServiceError says why not."""
        url = self.checked(text)  # before any lookup or connection
        try:
            async with asyncio.timeout(self.timeout_s):
                await self.slots.acquire()
        except TimeoutError:
            raise ServiceError(503, "too_many_fetches", "this worker fetches its limit of image URLs at once "
                                                        "(fetch_max_concurrent); retry shortly",
                               {"Retry-After": "1"}) from None
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._follow(url, held)
        except (TimeoutError, httpx.TimeoutException):
            raise ServiceError(504, "fetch_timeout", f"fetching the image from {url.host} took longer than "
                                                     f"{self.timeout_s:g} s (fetch_timeout_s)") from None
        except httpx.TransportError as e:
            raise fetch_failed(f"cannot fetch the image from {url.host}: {e or type(e).__name__}") from None
        finally:
            self.slots.release()

    async def _follow(self, url: httpx.URL, held: Held) -> bytes:
        for hop in range(MAX_REDIRECTS + 1):
            async with self.client.stream("GET", url) as response:
                if response.status_code in REDIRECTS:
                    location = response.headers.get("location")
                    if not location:
                        raise fetch_failed(f"{url.host} answered {response.status_code} without a Location")
                    if hop == MAX_REDIRECTS:
                        raise ServiceError(502, "too_many_redirects", "the image URL redirected more than "
                                                                      f"{MAX_REDIRECTS} times")
                    url = self.checked(str(url.join(location)))
                    continue
                if response.status_code != 200:
                    raise fetch_failed(f"{url.host} answered {response.status_code} for the image URL")
                return await self._body(response, held)
        raise AssertionError("unreachable: the last hop returns or raises")

    async def _body(self, response: httpx.Response, held: Held) -> bytes:
        too_large = ServiceError(413, "upload_too_large", "the image at the URL is larger than the limit of "
                                                          f"{self.max_bytes} bytes")
        if response.headers.get("content-encoding", "identity").lower() != "identity":
            raise fetch_failed("the image URL answered with a content-encoding; images are fetched as they are")
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise too_large
        body = bytearray()
        async for chunk in response.aiter_raw():  # counted as it arrives: an endless body stops at the limit
            if len(body) + len(chunk) > self.max_bytes:
                raise too_large
            held.take(len(chunk))
            body += chunk
        return bytes(body)
