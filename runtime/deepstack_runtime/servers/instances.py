"""The router's instances of each role: found (a file, a static list, or a DNS name),
probed (`/health`), taken out of rotation and brought back, and picked per request."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

log = logging.getLogger(__name__)


@dataclass
class Instance:
    url: str
    healthy: bool = False
    inflight: int = 0
    bootstrap: str = ""
    contract: str = ""  # the embedding contract it serves (RuntimeConfig.contract_hash)
    picked: int = 0  # when it was last picked (a pool-wide sequence number)
    slow_probes: int = 0  # consecutive health probes that timed out
    failures: int = 0  # consecutive requests it failed (a connection error)
    why: str = "not probed yet"  # why it is out of rotation, when it is

    def failed(self, *, unreachable: bool = False) -> None:
        """One request failed on it: out of rotation after REQUEST_FAILURES_UNHEALTHY
        in a row, or at once when it could not be reached at all (nothing listens: a
        process that died); back once a probe passes."""
        self.failures += 1
        if self.healthy and (unreachable or self.failures >= REQUEST_FAILURES_UNHEALTHY):
            self.healthy = False
            self.why = "unreachable" if unreachable else f"{self.failures} requests failed in a row"
            log.warning("%s out of rotation: %s", self.url, self.why)

    def served(self) -> None:
        self.failures = 0


# A probe that times out is usually a busy server, not a dead one (a refused connection
# or a bad answer counts at once): only this many in a row take it out of rotation. The
# timeout is the one the operator gives Kubernetes' probes of the same endpoint.
SLOW_PROBES_UNHEALTHY = 3
PROBE_TIMEOUT_SECONDS = 5


def probe_session() -> aiohttp.ClientSession:
    """The health probes' session: its own connections, each probe bounded in time."""
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_SECONDS))


# One failed request may be the request's bad luck (its peer went away); this many in a
# row take an instance out of rotation until its health probe passes again.
REQUEST_FAILURES_UNHEALTHY = 3


@dataclass
class Pool:
    """The instances of one role: a file listing them (re-read, so that the list can
    change without a restart), a static list, or the addresses behind a DNS name."""

    role: str
    static: list[str]
    dns_name: str = ""
    port: int = 8000
    instances_file: str = ""
    instances: dict[str, Instance] = field(default_factory=dict)
    _sequence: int = 0

    async def discover(self) -> list[str] | None:
        """The instances' URLs; None when they could not be looked up this time."""
        if self.instances_file:
            try:
                listed = json.loads(Path(self.instances_file).read_text()).get(self.role, [])
            except (OSError, json.JSONDecodeError, AttributeError):
                return None
            return [str(url) for url in listed]
        if self.static:
            return self.static
        if not self.dns_name:
            return []
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                self.dns_name, self.port, type=socket.SOCK_STREAM
            )
        except socket.gaierror as e:
            # No such name: a headless Service with no ready pod. Anything else (a DNS
            # server that did not answer) says nothing about the pods.
            return [] if e.errno == socket.EAI_NONAME else None
        except OSError:
            return None
        return sorted({f"http://{info[4][0]}:{self.port}" for info in infos})

    async def refresh(self, session: aiohttp.ClientSession) -> None:
        """Look the instances up again (a failed lookup keeps the ones known: their
        probes still tell), then probe them all. `session`: the probes' own (see
        `probe_session`), never the one requests use: a probe must not wait behind
        requests for a connection, or a busy instance would look dead."""
        urls = await self.discover()
        if urls is None:
            urls = list(self.instances)
        for url in list(self.instances):
            if url not in urls:
                del self.instances[url]
        before = {url: i.healthy for url, i in self.instances.items()}
        # All at once: one slow instance must not delay what the others report.
        await asyncio.gather(
            *(self._probe(session, self.instances.setdefault(url, Instance(url))) for url in urls)
        )
        for url, instance in self.instances.items():
            if instance.healthy != before.get(url, False):
                state = "in rotation" if instance.healthy else f"out of rotation: {instance.why}"
                log.info("%s %s %s", self.role, url, state)

    async def _probe(self, session: aiohttp.ClientSession, instance: Instance) -> None:
        try:
            async with session.get(f"{instance.url}/health") as r:
                body = await r.json() if r.status == 200 else {}
                instance.healthy = r.status == 200 and body.get("role") == self.role
                instance.why = f"/health answered {r.status}"
                instance.bootstrap = str(body.get("bootstrap", ""))
                instance.contract = str(body.get("contract", ""))
                instance.slow_probes = 0
                if instance.healthy:
                    instance.failures = 0
        except TimeoutError:
            instance.slow_probes += 1
            if instance.slow_probes >= SLOW_PROBES_UNHEALTHY:
                instance.healthy = False
                instance.why = f"{instance.slow_probes} probes timed out in a row"
        except (aiohttp.ClientError, json.JSONDecodeError, AttributeError) as e:
            instance.healthy = False
            instance.why = f"/health failed: {e!r}"

    def healthy(self) -> list[Instance]:
        return [i for i in self.instances.values() if i.healthy]

    def pick(self, contracts: set[str], avoid: frozenset[str] = frozenset()) -> Instance | None:
        """Of the instances serving one of `contracts` (and not in `avoid`): least
        in-flight; among equals, the one picked longest ago (round robin)."""
        healthy = [i for i in self.healthy() if i.contract in contracts and i.url not in avoid]
        if not healthy:
            return None
        chosen = min(healthy, key=lambda i: (i.inflight, i.picked, i.url))
        self._sequence += 1
        chosen.picked = self._sequence
        return chosen


def pick_pair(
    language: Pool,
    encode: Pool,
    with_encoder: bool,
    contract: str,
    avoid: frozenset[str] = frozenset(),
) -> tuple[Instance | None, Instance | None, str]:
    """(language instance, encode instance or None, why not) for one request.

    Only pods of this router's own contract: the prompt was tokenized with its model, and
    an image's embeddings only ever move between pods of one contract. (While a paired
    rollout runs two contracts are live; each router serves the one it was made for.)"""
    chosen = language.pick({contract}, avoid)
    if chosen is None:
        return None, None, f"no healthy language instance of contract {contract}"
    if not with_encoder:
        return chosen, None, ""
    encoder = encode.pick({contract}, avoid)
    if encoder is None or not encoder.bootstrap:
        return None, None, f"no healthy encode instance of contract {contract}"
    return chosen, encoder, ""
