"""Images a request names by http(s) URL, fetched by the router under the operator's
rules (router.mediaUrlDomains), so that a client cannot make the router reach what it
should not or spend what it should not.

- Only hosts on the allowlist are fetched: a name (`images.example.com`), every name
  under a domain (`*.example.com`), an address or a network (`203.0.113.7`,
  `10.1.0.0/16`). No list: no image is fetched.
- A host that resolves to a private, loopback, link-local or otherwise non-public
  address is refused unless that address is on the list as an address or network
  (a listed name is not enough: its DNS could point anywhere). The check is made on the
  addresses the connection then uses, on every redirect.
- At most MAX_REDIRECTS redirects, each to an allowed host; FETCH_TIMEOUT_SECONDS in
  all; MAX_IMAGE_BYTES of body.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urljoin, urlparse

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

MAX_REDIRECTS = 3
FETCH_TIMEOUT_SECONDS = 10.0
MAX_IMAGE_BYTES = 20 * 1024 * 1024  # the OpenAI API's limit per image

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class ImageFetchError(Exception):
    """An image URL that was not fetched, and why (the client's 400)."""


@dataclass(frozen=True)
class Allowlist:
    names: frozenset[str] = frozenset()  # exact host names
    suffixes: tuple[str, ...] = ()  # ".example.com" for "*.example.com"
    networks: tuple[Network, ...] = ()  # addresses (as /32 or /128) and networks

    @classmethod
    def parse(cls, entries: list[str] | tuple[str, ...]) -> Allowlist:
        """ValueError naming an entry that is none of the forms above."""
        names: set[str] = set()
        suffixes: list[str] = []
        networks: list[Network] = []
        for raw in entries:
            entry = raw.strip().lower().rstrip(".")
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
                continue
            except ValueError:
                pass
            name = entry.removeprefix("*.")
            labels = name.split(".")
            if not name or not all(label and label.replace("-", "").isalnum() for label in labels):
                raise ValueError(f"image URL allowlist: {raw!r} is not a host name or network")
            if entry.startswith("*."):
                suffixes.append("." + name)
            else:
                names.add(name)
        return cls(frozenset(names), tuple(suffixes), tuple(networks))

    @property
    def empty(self) -> bool:
        return not (self.names or self.suffixes or self.networks)

    def host_allowed(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        address = _address(host)
        if address is not None:
            return any(address in network for network in self.networks)
        return host in self.names or host.endswith(self.suffixes)

    def address_allowed(self, address: Address) -> bool:
        """Public addresses of an allowed host are; others only where listed."""
        if any(address in network for network in self.networks):
            return True
        return address.is_global and not address.is_multicast


def _address(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


class _CheckedResolver(AbstractResolver):
    """Resolves as usual, then refuses a host whose addresses are not all allowed: the
    connection uses exactly the addresses checked (no second lookup to rebind)."""

    def __init__(self, allowlist: Allowlist) -> None:
        self._allowlist = allowlist
        self._resolver = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._resolver.resolve(host, port, family)
        for result in results:
            address = ipaddress.ip_address(result["host"])
            if not self._allowlist.address_allowed(address):
                raise ImageFetchError(
                    f"{host} resolves to {address}, which is not a public address "
                    "(list it in router.mediaUrlDomains to allow it)"
                )
        return results

    async def close(self) -> None:
        await self._resolver.close()


class ImageFetcher:
    """Fetches image URLs under an Allowlist; one per router."""

    def __init__(self, allowlist: Allowlist) -> None:
        self.allowlist = allowlist
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(resolver=_CheckedResolver(self.allowlist)),
                timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT_SECONDS),
                trust_env=False,  # no proxy: the checks are on the addresses we connect to
            )
        return self._session

    async def fetch(self, url: str) -> bytes:
        """The image's bytes, or ImageFetchError saying why not."""
        if self.allowlist.empty:
            raise ImageFetchError(
                "this server fetches no image or video URLs (router.mediaUrlDomains is "
                "empty); send it as a data: URL"
            )
        try:
            async with asyncio.timeout(FETCH_TIMEOUT_SECONDS):
                return await self._follow(url)
        except TimeoutError as e:
            raise ImageFetchError(f"fetching took over {FETCH_TIMEOUT_SECONDS:g} s") from e
        except aiohttp.ClientError as e:
            raise ImageFetchError(f"fetching failed: {e}") from e
        except ImageFetchError:
            raise
        except OSError as e:  # a lookup that failed
            raise ImageFetchError(f"fetching failed: {e}") from e

    async def _follow(self, url: str) -> bytes:
        for _ in range(MAX_REDIRECTS + 1):
            self._check(url)
            async with self._client().get(url, allow_redirects=False) as r:
                if r.status in (301, 302, 303, 307, 308):
                    url = urljoin(url, r.headers.get("Location", ""))
                    continue
                if r.status != 200:
                    raise ImageFetchError(f"the server answered {r.status} {r.reason}")
                return await _body(r)
        raise ImageFetchError(f"more than {MAX_REDIRECTS} redirects")

    def _check(self, url: str) -> None:
        parsed = urlparse(url)
        host = parsed.hostname or ""
        if parsed.scheme not in ("http", "https") or not host:
            raise ImageFetchError(f"{url[:80]!r} is not an http(s) URL with a host")
        if not self.allowlist.host_allowed(host):
            raise ImageFetchError(f"{host} is not in router.mediaUrlDomains")
        address = _address(host)
        # A literal address never reaches the resolver: checked here.
        if address is not None and not self.allowlist.address_allowed(address):
            raise ImageFetchError(f"{host} is not a public address")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


async def _body(r: aiohttp.ClientResponse) -> bytes:
    length = r.content_length
    if length is not None and length > MAX_IMAGE_BYTES:
        raise ImageFetchError(f"the image is {length} bytes; the limit is {MAX_IMAGE_BYTES}")
    data = bytearray()
    async for chunk in r.content.iter_chunked(64 * 1024):
        data += chunk
        if len(data) > MAX_IMAGE_BYTES:
            raise ImageFetchError(f"the image is over the limit of {MAX_IMAGE_BYTES} bytes")
    return bytes(data)
