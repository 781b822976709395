"""The guarded fetcher of image URLs (service/http/fetch.py), in process.

Every URL a test here fetches names a server the test starts on 127.0.0.1 (helpers/origin.py), or a host a test's
own resolver maps to 127.0.0.1; the address checks of every other range are tests of the checking function, which
opens no connection. A guard fails any test whose fetcher would connect anywhere but 127.0.0.1."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time

import httpcore
import pytest
from helpers.origin import origin
from helpers.service import image_bytes

from service.errors import ServiceError
from service.http.fetch import Fetcher, address_refusal
from service.http.uploads import ByteBudget
from service.settings import Settings

PNG = image_bytes(1)


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Every connection a fetcher opens goes to 127.0.0.1, or the test fails before it is made."""
    connect = httpcore.AnyIOBackend.connect_tcp
    opened: list[str] = []

    async def guarded(self, host, port, *args, **kwargs):
        assert host == "127.0.0.1", f"a fetch tried to connect to {host}"
        opened.append(host)
        return await connect(self, host, port, *args, **kwargs)

    monkeypatch.setattr(httpcore.AnyIOBackend, "connect_tcp", guarded)
    return opened


def fetcher(allow: str, private: bool = True, **overrides) -> Fetcher:
    values = {"fetch_urls": True, "fetch_allow": allow, "fetch_allow_private": private, "fetch_allow_http": True,
              "fetch_timeout_s": 0.5, **overrides}
    return Fetcher(Settings(**values))


async def fetch(f: Fetcher, url: str, budget: int = 1 << 30) -> bytes:
    """The fetcher's answer (its ServiceError raised), the fetcher closed after."""
    try:
        with ByteBudget(budget).hold() as held:
            return await f.fetch(url, held)
    finally:
        await f.close()


def refusal(f: Fetcher, url: str) -> ServiceError:
    with pytest.raises(ServiceError) as caught:
        asyncio.run(fetch(f, url))
    return caught.value


# The checking function: each range, no connection.
REFUSED = {
    "127.0.0.1": "loopback", "127.8.9.10": "loopback", "::1": "loopback",
    "10.1.2.3": "private", "172.16.0.1": "private", "192.168.1.1": "private", "fc00::1": "private",
    "169.254.169.254": "link-local", "169.254.0.1": "link-local", "fe80::1": "link-local",
    "100.64.0.1": "non-public",  # carrier-grade NAT
    "::ffff:127.0.0.1": "loopback", "::ffff:169.254.169.254": "link-local", "::ffff:10.0.0.1": "private",
    "64:ff9b::a9fe:a9fe": "link-local",  # NAT64 of 169.254.169.254
    "2002:7f00:1::": "loopback",  # 6to4 of 127.0.0.1
}
NEVER = {"224.0.0.1": "multicast", "ff02::1": "multicast", "0.0.0.0": "unspecified", "::": "unspecified",
         "0.1.2.3": "unspecified", "240.0.0.1": "reserved", "255.255.255.255": "reserved"}
PUBLIC = ["93.184.216.34", "8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "2a00:1450:4001:80b::200e"]


@pytest.mark.parametrize(("address", "kind"), sorted({**REFUSED, **NEVER}.items()))
def test_non_public_addresses_are_refused(address, kind):
    assert address_refusal(ipaddress.ip_address(address)) == kind


@pytest.mark.parametrize("address", sorted(REFUSED))
def test_fetch_allow_private_allows_loopback_private_and_link_local(address):
    assert address_refusal(ipaddress.ip_address(address), allow_private=True) is None


@pytest.mark.parametrize(("address", "kind"), sorted(NEVER.items()))
def test_multicast_unspecified_and_reserved_addresses_are_never_fetched(address, kind):
    assert address_refusal(ipaddress.ip_address(address), allow_private=True) == kind


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_are_fetched(address):
    assert address_refusal(ipaddress.ip_address(address)) is None


def test_a_host_that_resolves_to_any_refused_address_is_refused_before_connecting(monkeypatch, loopback_only):
    """Every address of the host is checked, not only the first: a public one beside 169.254.169.254 does not
    let the fetch through, and nothing is connected to."""
    answers = {"metadata.test": ["93.184.216.34", "169.254.169.254"], "inside.test": ["10.0.0.7"]}

    def resolver(host, port, *args, **kwargs):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in answers[host]]

    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    error = refusal(fetcher("*", private=False), "https://metadata.test/latest/meta-data")
    assert (error.status, error.error) == (403, "url_not_allowed") and "169.254.169.254" in error.detail
    error = refusal(fetcher("*", private=False), "https://inside.test/cat.png")
    assert (error.status, error.error) == (403, "url_not_allowed") and "private" in error.detail
    assert loopback_only == []


@pytest.mark.parametrize(("url", "allowed"), [
    ("https://images.example.com/a.png", True), ("https://images.example.com:8443/a.png", True),
    ("https://IMAGES.example.com/a.png", True), ("https://images.example.com.evil.test/a.png", False),
    ("https://evil.test/images.example.com/a.png", False),
    ("https://a.cdn.example.net/x.jpg", True), ("https://a.b.cdn.example.net/x.jpg", True),
    ("https://cdn.example.net/x.jpg", False),
    ("http://127.0.0.1:8080/x", True), ("http://127.0.0.1:8081/x", False), ("http://127.0.0.1/x", False),
    ("https://store.example.org/images/cat.png", True), ("https://store.example.org/imagesX/cat.png", False),
    ("https://store.example.org/other.png", False), ("http://store.example.org/images/cat.png", False),
    ("https://store.example.org:444/images/cat.png", False),
    ("https://pics.example.org/a", True), ("https://pics.example.org/a/b.png", True),
    ("https://pics.example.org/ab.png", False),
])
def test_the_allow_list_matches_hosts_subdomains_ports_and_prefixes(url, allowed):
    f = fetcher("images.example.com, *.cdn.example.net, 127.0.0.1:8080, https://store.example.org/images/, "
                "https://pics.example.org/a")
    if allowed:
        assert f.checked(url).host
    else:
        with pytest.raises(ServiceError) as caught:
            f.checked(url)
        assert (caught.value.status, caught.value.error) == (403, "url_not_allowed")


@pytest.mark.parametrize(("url", "status", "error"), [
    ("ftp://images.example.com/a.png", 422, "invalid_url"), ("file:///etc/passwd", 422, "invalid_url"),
    ("https://user:secret@images.example.com/a.png", 422, "invalid_url"), ("images.example.com/a.png", 422,
                                                                            "invalid_url"),
    ("https://images.example.com/a/%2e%2e/b.png", 422, "invalid_url"), ("https://" + "a" * 3000, 422, "invalid_url"),
    ("http://images.example.com/a.png", 403, "url_not_allowed"),  # http: not allowed here
])
def test_malformed_urls_credentials_and_plain_http_are_refused(url, status, error):
    f = fetcher("images.example.com", fetch_allow_http=False)
    with pytest.raises(ServiceError) as caught:
        f.checked(url)
    assert (caught.value.status, caught.value.error) == (status, error), caught.value.detail


def test_an_allowed_host_is_served():
    with origin(PNG) as server:
        assert asyncio.run(fetch(fetcher(f"127.0.0.1:{server.port}"), f"{server.base}/image")) == PNG
        assert asyncio.run(fetch(fetcher(f"127.0.0.1:{server.port}"), f"{server.base}/chunked")) == PNG
        assert asyncio.run(fetch(fetcher(f"{server.base}/chunked"), f"{server.base}/chunked")) == PNG  # a prefix


def test_the_connection_goes_to_the_checked_address_with_the_urls_own_host(monkeypatch, loopback_only):
    """The fetcher resolves the host once, checks it, and connects to that address; the Host header (and, over TLS,
    SNI and the certificate check) keep the URL's name."""
    lookups = []

    def resolver(host, port, *args, **kwargs):
        lookups.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    with origin(PNG) as server:
        assert asyncio.run(fetch(fetcher("images.test"), f"http://images.test:{server.port}/image")) == PNG
        assert lookups == ["images.test"] and loopback_only == ["127.0.0.1"]
        assert server.requests == [("/image", f"images.test:{server.port}")]


def test_a_host_not_on_the_allow_list_is_refused_before_any_connection():
    with origin(PNG) as allowed, origin(PNG) as other:
        error = refusal(fetcher(f"127.0.0.1:{allowed.port}"), f"{other.base}/image")
        assert (error.status, error.error) == (403, "url_not_allowed")
        assert other.connections == 0 and allowed.connections == 0


def test_loopback_is_refused_unless_allowed():
    with origin(PNG) as server:
        for url in (f"{server.base}/image", f"http://localhost:{server.port}/image"):
            error = refusal(fetcher(f"127.0.0.1:{server.port},localhost:{server.port}", private=False), url)
            assert (error.status, error.error) == (403, "url_not_allowed") and "loopback" in error.detail, url
            assert "fetch_allow_private" in error.detail
        assert server.connections == 0
        assert asyncio.run(fetch(fetcher(f"127.0.0.1:{server.port}", private=True), f"{server.base}/image")) == PNG


def test_a_slow_server_hits_the_timeout():
    with origin(PNG, slow_s=5) as server:
        start = time.monotonic()
        error = refusal(fetcher(f"127.0.0.1:{server.port}", fetch_timeout_s=0.5), f"{server.base}/slow")
        assert (error.status, error.error) == (504, "fetch_timeout") and "0.5 s" in error.detail
        assert time.monotonic() - start < 3


def test_an_endless_body_stops_at_the_byte_limit_and_counts_in_the_workers_budget():
    async def scenario(f: Fetcher, url: str) -> tuple[ServiceError, int]:
        budget = ByteBudget(1 << 30)
        try:
            with budget.hold() as held:
                with pytest.raises(ServiceError) as caught:
                    await f.fetch(url, held)
                return caught.value, held.bytes
        finally:
            await f.close()

    with origin(PNG) as server:
        f = fetcher(f"127.0.0.1:{server.port}", max_upload_bytes=300_000, max_inflight_bytes=300_000 * 16)
        error, held = asyncio.run(scenario(f, f"{server.base}/endless"))
        assert (error.status, error.error) == (413, "upload_too_large")
        assert 0 < held <= 300_000  # what was read was taken from the budget, and no more than the limit


def test_redirects_are_followed_three_times_at_most_each_checked_again():
    with origin(PNG) as server, origin(PNG) as other:
        allow = f"127.0.0.1:{server.port},0.0.0.0:{other.port}"
        assert asyncio.run(fetch(fetcher(allow), f"{server.base}/hops/3")) == PNG
        error = refusal(fetcher(allow), f"{server.base}/hops/4")
        assert (error.status, error.error) == (502, "too_many_redirects")
        # to a host not on the allow-list, and to an address never fetched (0.0.0.0 reaches this host on Linux)
        for target in (f"{other.base}/image", f"http://0.0.0.0:{other.port}/image"):
            error = refusal(fetcher(allow), f"{server.base}/redirect?to={target}")
            assert (error.status, error.error) == (403, "url_not_allowed"), error.detail
        assert "unspecified" in error.detail
        assert other.connections == 0


def test_upstream_failures_are_502():
    with origin(PNG) as server:
        allow = f"127.0.0.1:{server.port}"
        for path, words in (("/missing", "answered 404"), ("/gzip", "content-encoding")):
            error = refusal(fetcher(allow), f"{server.base}{path}")
            assert (error.status, error.error) == (502, "fetch_failed") and words in error.detail
        port = server.port
    error = refusal(fetcher(allow), f"http://127.0.0.1:{port}/image")  # nothing listens there any more
    assert (error.status, error.error) == (502, "fetch_failed")


def test_fetches_beyond_the_workers_cap_wait_then_get_503():
    async def scenario(f: Fetcher) -> ServiceError:
        await f.slots.acquire()  # the one fetch this worker may run, taken
        with pytest.raises(ServiceError) as caught:
            await fetch(f, "http://127.0.0.1:9/image")
        return caught.value

    error = asyncio.run(scenario(fetcher("127.0.0.1", fetch_max_concurrent=1, fetch_timeout_s=0.2)))
    assert (error.status, error.error, error.headers) == (503, "too_many_fetches", {"Retry-After": "1"})


def test_fetch_urls_needs_an_allow_list():
    with pytest.raises(ValueError, match="fetch_allow"):
        Settings(fetch_urls=True)
