"""Which pod serves a request: rendezvous hashing of its content, with bounded load.

Why: an encode pod keeps an embedding cache and a language pod keeps a prefix (KV)
cache, so a request should land where its state already is. Rendezvous (highest random
weight) hashing gives every (key, pod) pair a stable pseudo-random weight and picks the
heaviest pod: when a pod comes or goes, only the keys whose heaviest pod it was move,
about 1/n of them, and nothing needs to be shared between router replicas. Bounded load
(Mirrokni, Thorup and Zadimoghaddam, "Consistent hashing with bounded loads") keeps a hot
key from swamping its pod: a pod that would rise above (1 + epsilon) times the mean load
is passed over for the next pod by weight.

Keys:
- encode pods: the content hashes of the request's images, in prompt order. Only the
  FIRST image ranks the pods. A follow-up turn repeats the conversation's earlier images
  before its new ones, so with the first image as the key every turn of a conversation
  goes to the pod that already holds its history's rows, and its new images are cached
  there too. Scoring by a sum or a max over all images would move a conversation each
  time an image is added (and a max sends [A, B] away from A's pod half the time).
- language pods: `conversation_key`, the prompt through the first image.

Pure: no torch, no I/O (an import-linter contract keeps it so). Hashes are blake2b,
stable across processes and machines (never Python's salted `hash()`).
"""

from __future__ import annotations

import hashlib
import math
import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

# Bounded load's default epsilon: a pod may take up to 25% more than the mean before it
# is passed over (the paper's c = 1 + epsilon; 0.25 keeps most keys on their pod while
# capping the hottest at 1.25x the mean).
DEFAULT_EPSILON = 0.25


@dataclass(frozen=True)
class Candidate:
    """A pod that may serve the request, and its load now: the requests in flight at it
    (an integer: the bound's guarantee that some pod is always eligible needs whole
    numbers)."""

    url: str
    load: int


def weight(key: str, url: str) -> int:
    """The rendezvous weight of `url` for `key`: 64 stable pseudo-random bits."""
    digest = hashlib.blake2b(
        key.encode() + b"\x00" + url.encode(), digest_size=8, person=b"deepstack-hrw"
    ).digest()
    return int.from_bytes(digest, "big")


def load_ceiling(candidates: Sequence[Candidate], epsilon: float) -> float:
    """The most requests a pod may hold once it takes this one:
    ceil((1 + epsilon) x (total load + 1) / pods). Rounding up keeps at least one pod
    eligible (the ceilings sum to more than the load); infinite epsilon: no bound."""
    if math.isnan(epsilon) or epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    if math.isinf(epsilon):
        return math.inf
    total = sum(c.load for c in candidates)
    return math.ceil((1 + epsilon) * (total + 1) / len(candidates))


def rendezvous_rank(
    keys: Sequence[str], candidates: Sequence[Candidate], epsilon: float = DEFAULT_EPSILON
) -> list[str]:
    """Every candidate's url, most preferred first: the pods within the load ceiling by
    weight for `keys[0]` (see the module docstring), then the passed-over ones by weight
    (the last resorts for a retry). With no keys (a text-only request), least loaded
    first, ties by url. Raises ValueError for no candidates, a repeated url, a negative
    load or a negative or NaN epsilon."""
    _check(candidates)
    ceiling = load_ceiling(candidates, epsilon)
    if not keys:
        return [c.url for c in sorted(candidates, key=lambda c: (c.load, c.url))]
    by_weight = sorted(candidates, key=lambda c: (weight(keys[0], c.url), c.url), reverse=True)
    within = [c.url for c in by_weight if c.load + 1 <= ceiling]
    over = [c.url for c in by_weight if c.load + 1 > ceiling]
    return within + over


def rendezvous_pick(
    keys: Sequence[str], candidates: Sequence[Candidate], epsilon: float = DEFAULT_EPSILON
) -> str:
    """The pod for a request with these content keys: `rendezvous_rank(...)[0]`."""
    return rendezvous_rank(keys, candidates, epsilon)[0]


def conversation_key(
    token_ids: Sequence[int], image_token_id: int, image_keys: Sequence[str]
) -> str | None:
    """The language-pod affinity key of a prompt: its token ids up to the end of the first
    image's run of `image_token_id` tokens, with that image's content hash (`image_keys[0]`:
    the ids alone cannot tell two images of the same size apart). Every later turn of the
    conversation starts with the same prefix (chat templates render history unchanged),
    so all turns share the key, and the pod that has the prefix's KV cache gets them.
    None for a prompt with no image token: the caller then passes no key to
    `rendezvous_pick` (least loaded). ValueError for image tokens with no image key."""
    try:
        first = token_ids.index(image_token_id)
    except ValueError:
        return None
    if not image_keys:
        raise ValueError("the prompt has image tokens but no image keys were given")
    end = first
    while end < len(token_ids) and token_ids[end] == image_token_id:
        end += 1
    ids = array("q", token_ids[:end])  # int64 words, little-endian on every host
    if sys.byteorder != "little":
        ids.byteswap()
    h = hashlib.blake2b(digest_size=16, person=b"deepstack-conv")
    h.update(image_keys[0].encode() + b"\x00")
    h.update(ids.tobytes())
    return h.hexdigest()


def _check(candidates: Sequence[Candidate]) -> None:
    if not candidates:
        raise ValueError("no candidates to pick from")
    urls = [c.url for c in candidates]
    if len(set(urls)) != len(urls):
        raise ValueError(f"candidate urls repeat: {sorted(urls)}")
    if any(c.load < 0 for c in candidates):
        raise ValueError("a candidate's load is negative")
