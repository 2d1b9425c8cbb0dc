"""Remote media fetching for the server: async (never on the step or preprocessing threads) and SSRF-safe.

* Each URL's host is resolved once (on the event loop's resolver) and every resolved address is checked; the
  connection then goes to the checked address (the URL's host becomes the `Host` header and the TLS SNI name, so
  certificates are still verified against it), so a DNS answer that changes between check and connect (rebinding)
  cannot redirect it.
* Refused unless `allow_private`: loopback, private, link-local, multicast, reserved, unspecified, shared (CGNAT)
  addresses and IPv6 forms that embed an IPv4 address (IPv4-mapped/compatible, 6to4, Teredo). Numeric forms
  such as `127.1` or `2130706433` resolve to 127.0.0.1 and are refused with it.
* `allowed_domains` (when set): the host must be one of them or a subdomain.
* Redirects are followed by hand, at most `max_redirects`, each hop checked like the first URL.
* Byte cap while streaming (Content-Length is not trusted); the caller puts all of a request's fetches under one
  deadline; `max_concurrent` fetches server-wide.
* Every network failure (DNS, refused, reset, timeout, HTTP error status) gets the same client message so that
  answers cannot be used to scan ports or hosts; the detail goes to the server log.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from dataclasses import dataclass

import httpx

logger = logging.getLogger("qwen2vl.server")
FETCH_FAILED = "could not fetch the media URL (network error, error status or timeout)."
_REDIRECTS = (301, 302, 303, 307, 308)


class FetchError(Exception):
    """A fetch failed; `code` tells a policy refusal (`media_not_allowed`) from other failures."""

    def __init__(self, message: str, code: str = "media_fetch_failed"):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class FetchPolicy:
    allow_private: bool = False
    allowed_domains: tuple[str, ...] = ()
    max_redirects: int = 3
    max_concurrent: int = 8
    deadline: float = 20.0  # seconds for all of one request's fetches together


def is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True for a globally routable unicast address that does not embed an IPv4 address."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None or (int(ip) >> 32 == 0):  # mapped / 6to4 / Teredo / IPv4-compatible (::a.b.c.d)
            return False
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_private or ip.is_loopback
                                 or ip.is_link_local or ip.is_unspecified)


def _domain_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    host = host.lower().rstrip(".")
    return any(host == d or host.endswith("." + d) for d in allowed)


class MediaFetcher:
    def __init__(self, policy: FetchPolicy):
        self.policy = policy
        self._sem: asyncio.Semaphore | None = None

    async def _address(self, url: httpx.URL) -> str:
        """The one address this URL may be fetched from (raises FetchError)."""
        if url.scheme not in ("http", "https") or not url.host:
            raise FetchError("only http(s):// URLs with a host can be fetched.", "media_not_allowed")
        if self.policy.allowed_domains and not _domain_allowed(url.host, self.policy.allowed_domains):
            raise FetchError("the URL's host is not in this server's --allowed-media-domains.", "media_not_allowed")
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(url.host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as e:
            logger.info("media fetch: cannot resolve %r: %s", url.host, e)
            raise FetchError(FETCH_FAILED) from None
        addrs = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
        if not addrs:
            raise FetchError(FETCH_FAILED)
        if not self.policy.allow_private and not all(is_public(a) for a in addrs):
            raise FetchError("the URL's host is a loopback, private, link-local or otherwise reserved address, "
                             "which this server does not fetch from (see --allow-private-media-urls).",
                             "media_not_allowed")
        return str(addrs[0])

    async def fetch(self, url: str, max_bytes: int) -> bytes:
        """The body of `url` (following checked redirects), at most `max_bytes` bytes."""
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.policy.max_concurrent)
        async with self._sem:
            try:
                return await self._fetch(httpx.URL(url), max_bytes)
            except FetchError:
                raise
            except (httpx.HTTPError, OSError, ValueError) as e:  # connect/read errors, malformed URLs
                logger.info("media fetch failed: %s: %s", type(e).__name__, e)
                raise FetchError(FETCH_FAILED) from None

    async def _fetch(self, url: httpx.URL, max_bytes: int) -> bytes:
        # trust_env=False: no proxies or netrc from the environment; redirects are handled below.
        async with httpx.AsyncClient(follow_redirects=False, trust_env=False, timeout=self.policy.deadline) as client:
            for _hop in range(self.policy.max_redirects + 1):
                ip = await self._address(url)
                target = url.copy_with(host=ip)
                host_header = url.host if url.port is None else f"{url.host}:{url.port}"
                ext = {"sni_hostname": url.host} if url.scheme == "https" else {}
                req = client.build_request("GET", target, headers={"Host": host_header}, extensions=ext)
                resp = await client.send(req, stream=True)
                try:
                    if resp.status_code in _REDIRECTS and "location" in resp.headers:
                        url = url.join(resp.headers["location"])
                        continue
                    if resp.status_code >= 400:
                        logger.info("media fetch: HTTP %d from %s", resp.status_code, url.host)
                        raise FetchError(FETCH_FAILED)
                    return await _read_capped(resp, max_bytes)
                finally:
                    await resp.aclose()
        logger.info("media fetch: more than %d redirects", self.policy.max_redirects)
        raise FetchError(FETCH_FAILED)


async def _read_capped(resp: httpx.Response, max_bytes: int) -> bytes:
    declared = resp.headers.get("content-length")
    too_big = FetchError(f"the media is over the {max_bytes}-byte limit.", "media_too_large")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise too_big
    buf = bytearray()
    async for chunk in resp.aiter_bytes():
        buf += chunk
        if len(buf) > max_bytes:
            raise too_big
    return bytes(buf)
