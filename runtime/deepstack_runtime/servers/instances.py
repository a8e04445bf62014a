"""The router's instances of each role: found (a file, a static list, or a DNS name),
probed (`/health`), taken out of rotation and brought back, and picked per request."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from deepstack_runtime.config import HTTP_PORT
from deepstack_runtime.routing import Candidate, rendezvous_pick

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
    port: int = HTTP_PORT
    instances_file: str = ""
    instances: dict[str, Instance] = field(default_factory=dict)
    # Instances no longer listed while requests still run on them: one that is listed
    # again (a pod whose readiness flapped) comes back with the count of those requests.
    _departed: dict[str, Instance] = field(default_factory=dict)
    _sequence: int = 0

    async def discover(self) -> list[str] | None:
        """The instances' URLs; None when they could not be looked up this time."""
        if self.instances_file:
            try:
                listed = json.loads(Path(self.instances_file).read_text()).get(self.role, [])
            except (OSError, ValueError, AttributeError):
                return None
            if not isinstance(listed, list):
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
                gone = self.instances.pop(url)
                if gone.inflight:
                    self._departed[url] = gone
        for url, gone in list(self._departed.items()):
            if not gone.inflight:
                del self._departed[url]
        before = {url: i.healthy for url, i in self.instances.items()}
        for url in urls:
            if url not in self.instances:
                back = self._departed.pop(url, None)
                if back is None:
                    self.instances[url] = Instance(url)
                else:  # the releases of its requests go to this object
                    back.healthy, back.why = False, "listed again, not probed yet"
                    self.instances[url] = back
        # All at once: one slow instance must not delay what the others report.
        await asyncio.gather(*(self._probe(session, self.instances[url]) for url in urls))
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
        except (aiohttp.ClientError, ValueError, TypeError, AttributeError) as e:
            # (a body that is not UTF-8 or not JSON is a ValueError)
            instance.healthy = False
            instance.why = f"/health failed: {e!r}"

    def healthy(self) -> list[Instance]:
        return [i for i in self.instances.values() if i.healthy]

    def pick(self, candidates: list[Instance], key: str | None = None) -> Instance:
        """Of `candidates` (of this pool): the one `key` hashes to (rendezvous hashing
        with bounded load: routing.py), so that the same content lands where its state
        is; without a key, least in flight, and among equals the one picked longest ago
        (round robin)."""
        if key is not None:
            url = rendezvous_pick([key], [Candidate(i.url, i.inflight) for i in candidates])
            chosen = next(i for i in candidates if i.url == url)
        else:
            chosen = min(candidates, key=lambda i: (i.inflight, i.picked, i.url))
        self._sequence += 1
        chosen.picked = self._sequence
        return chosen


@dataclass(frozen=True)
class Pair:
    """The instances one request runs on (no encoder for a text-only prompt)."""

    language: Instance
    encoder: Instance | None


@dataclass(frozen=True)
class RouteKeys:
    """What a request's pair is picked by: its images' content hashes (the encode pod;
    the first image's decides) and its conversation's key (the language pod)."""

    images: list[str] = field(default_factory=list)
    conversation: str | None = None

    def of(self, role: str) -> str | None:
        if role == "encode":
            return self.images[0] if self.images else None
        return self.conversation


class Unavailable(Exception):
    """No pair can take a request now: the message says why; `retry_after` (seconds)
    when a client should come back."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


# How long a burst of completions is remembered, to tell a client when to come back.
THROUGHPUT_WINDOW_SECONDS = 10.0
MAX_RETRY_AFTER_SECONDS = 30


@dataclass(eq=False)
class _Waiter:
    """A request waiting for a pair; `why` it has none yet (`busy`: all it may use are
    full, rather than none healthy)."""

    with_encoder: bool
    avoid: frozenset[str]
    keys: RouteKeys
    granted: asyncio.Future[Pair]
    why: str = ""
    busy: bool = False


class Fleet:
    """Both roles' pools, refreshed by one health loop, and the pairs requests run on.

    Only instances of the router's own contract serve: the prompt was tokenized with its
    model, and an image's embeddings only ever move between pods of one contract. (While
    a paired rollout runs, two contracts are live; each router serves the one it was made
    for.) Each instance takes at most `per_instance` requests at once from this router,
    the pods' own queue bound: a request that finds every pair busy waits, in arrival
    order, for one to free up (up to `queue_wait` seconds), so that the pods are never
    given more than they take, and no request is refused by a pod after work was spent
    on it. With no healthy pair at all it waits up to `instance_wait` seconds (a pod
    restarting, a probe that has not passed yet)."""

    def __init__(
        self,
        pools: dict[str, Pool],
        contract: str,
        *,
        per_instance: int,
        instance_wait: float,
        queue_wait: float,
        health_interval: float,
    ) -> None:
        self.pools = pools
        self.contract = contract
        self.per_instance = per_instance
        self.instance_wait = instance_wait
        self.queue_wait = queue_wait
        self.health_interval = health_interval
        self._waiters: deque[_Waiter] = deque()  # in arrival order
        self._completions: deque[float] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def run(self, session: aiohttp.ClientSession, before_round: Callable[[], None]) -> None:
        """The health loop: look up and probe both pools, again and again."""
        while True:
            try:
                before_round()
                await asyncio.gather(*(p.refresh(session) for p in self.pools.values()))
                self._dispatch()
            except Exception:  # the loop must outlive any one round (keys re-read too)
                log.exception("a round of the health loop failed; the next one runs as usual")
            await asyncio.sleep(self.health_interval)

    def _ours(self, role: str, avoid: frozenset[str]) -> list[Instance]:
        pool = self.pools[role]
        return [i for i in pool.healthy() if i.contract == self.contract and i.url not in avoid]

    def _pick(
        self, with_encoder: bool, avoid: frozenset[str], keys: RouteKeys
    ) -> tuple[Pair | None, str, bool]:
        """(a pair with room, or None with why not and whether it is only busy)."""
        roles = ("language", "encode") if with_encoder else ("language",)
        chosen: dict[str, Instance] = {}
        for role in roles:
            healthy = self._ours(role, avoid)
            if role == "encode":
                healthy = [i for i in healthy if i.bootstrap]
            if not healthy:
                return None, f"no healthy {role} instance of contract {self.contract}", False
            free = [i for i in healthy if i.inflight < self.per_instance]
            if not free:
                return None, (
                    f"every {role} instance of contract {self.contract} is busy "
                    f"({len(healthy)} x {self.per_instance} requests)"
                ), True  # fmt: skip
            chosen[role] = self.pools[role].pick(free, keys.of(role))
        return Pair(chosen["language"], chosen.get("encode")), "", False

    def _dispatch(self) -> None:
        """Give pairs to the waiters that can have one now, in arrival order (one that
        needs what is full does not hold back one that does not)."""
        for waiter in list(self._waiters):
            if waiter.granted.done():  # gave up meanwhile
                self._waiters.remove(waiter)
                continue
            pair, waiter.why, waiter.busy = self._pick(
                waiter.with_encoder, waiter.avoid, waiter.keys
            )
            if pair is not None:
                pair.language.inflight += 1
                if pair.encoder is not None:
                    pair.encoder.inflight += 1
                self._waiters.remove(waiter)
                waiter.granted.set_result(pair)

    async def acquire(
        self,
        with_encoder: bool,
        avoid: frozenset[str] = frozenset(),
        *,
        keys: RouteKeys | None = None,
        wait: bool = True,
    ) -> Pair:
        """A pair for one request, its place on both instances taken (give it back with
        `release`), picked by `keys` among those with room; Unavailable when there is
        none within the waits (or at once, without `wait`)."""
        granted = asyncio.get_running_loop().create_future()
        waiter = _Waiter(with_encoder, avoid, keys or RouteKeys(), granted)
        self._waiters.append(waiter)
        self._dispatch()
        started = time.monotonic()
        try:
            while not waiter.granted.done():
                limit = self.queue_wait if waiter.busy else self.instance_wait
                remaining = started + limit - time.monotonic()
                if not wait or remaining <= 0:
                    raise Unavailable(waiter.why, self.retry_after())
                # asyncio.timeout, not wait_for: on 3.11 wait_for can drop a cancellation
                # (a client that went away) that arrives as the pair is granted.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await asyncio.shield(waiter.granted)
            return waiter.granted.result()
        except BaseException:
            if waiter.granted.done() and not waiter.granted.cancelled():
                self.release(waiter.granted.result())  # granted as the caller gave up
            else:
                waiter.granted.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    def release(self, pair: Pair) -> None:
        pair.language.inflight -= 1
        if pair.encoder is not None:
            pair.encoder.inflight -= 1
        self._completions.append(time.monotonic())
        self._dispatch()

    def retry_after(self) -> int:
        """When a client turned away should come back: the time the requests already
        waiting take at the rate requests have recently completed (1 to 30 s)."""
        now = time.monotonic()
        while self._completions and self._completions[0] < now - THROUGHPUT_WINDOW_SECONDS:
            self._completions.popleft()
        rate = len(self._completions) / THROUGHPUT_WINDOW_SECONDS
        if rate <= 0:
            return 1
        return max(1, min(MAX_RETRY_AFTER_SECONDS, math.ceil((self.waiting + 1) / rate)))
