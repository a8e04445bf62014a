from __future__ import annotations

import math
import subprocess
import sys
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepstack_runtime.routing import (
    Candidate,
    conversation_key,
    load_ceiling,
    rendezvous_pick,
    rendezvous_rank,
    weight,
)

KEYS = [f"{i:064x}" for i in range(20_000)]  # stand-ins for sha256 hex digests


def pods(n: int, load: int = 0) -> list[Candidate]:
    return [Candidate(f"http://encode-{i}:8000", load) for i in range(n)]


def owners(keys: list[str], candidates: list[Candidate]) -> dict[str, str]:
    return {k: rendezvous_pick([k], candidates) for k in keys}


def test_pick_is_deterministic_and_independent_of_candidate_order() -> None:
    candidates = pods(5)
    first = owners(KEYS[:500], candidates)
    assert owners(KEYS[:500], candidates) == first
    assert owners(KEYS[:500], list(reversed(candidates))) == first


def test_weights_are_stable_across_processes() -> None:
    """blake2b, not Python's salted hash(): another interpreter (another router replica,
    another PYTHONHASHSEED) computes the same weights."""
    code = "from deepstack_runtime.routing import weight; print(weight('img', 'http://a'))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONHASHSEED": "12345", "PATH": ""},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert int(out.stdout) == weight("img", "http://a")


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_random_keys_spread_evenly(n: int) -> None:
    counts = Counter(owners(KEYS, pods(n)).values())
    expected = len(KEYS) / n
    assert len(counts) == n
    # Binomial sd is sqrt(N p (1-p)) <= 71 here; 8% of the mean is at least 5 sd.
    for url, count in counts.items():
        assert abs(count - expected) < 0.08 * expected, (url, count, expected)


@pytest.mark.parametrize("n", [2, 4, 7])
def test_removing_a_pod_moves_only_its_keys(n: int) -> None:
    candidates = pods(n)
    before = owners(KEYS, candidates)
    gone = candidates[1].url
    after = owners(KEYS, [c for c in candidates if c.url != gone])
    moved = {k for k in KEYS if before[k] != after[k]}
    assert moved == {k for k in KEYS if before[k] == gone}
    assert abs(len(moved) / len(KEYS) - 1 / n) < 0.02


@pytest.mark.parametrize("n", [1, 3, 6])
def test_adding_a_pod_moves_keys_only_to_it(n: int) -> None:
    candidates = pods(n)
    before = owners(KEYS, candidates)
    new = Candidate("http://encode-new:8000", 0)
    after = owners(KEYS, [*candidates, new])
    moved = {k for k in KEYS if before[k] != after[k]}
    assert {after[k] for k in moved} == {new.url}
    assert abs(len(moved) / len(KEYS) - 1 / (n + 1)) < 0.02


def test_text_only_requests_go_to_the_least_loaded() -> None:
    candidates = [Candidate("http://b", 2), Candidate("http://a", 1), Candidate("http://c", 1)]
    assert rendezvous_pick([], candidates) == "http://a"  # ties by url
    assert rendezvous_rank([], candidates) == ["http://a", "http://c", "http://b"]


def test_only_the_first_image_ranks_pods() -> None:
    """A follow-up turn repeats the first image and adds more: it stays on the pod that
    holds the conversation's rows."""
    candidates = pods(6)
    for first in KEYS[:200]:
        alone = rendezvous_pick([first], candidates)
        assert rendezvous_pick([first, KEYS[-1], KEYS[-2]], candidates) == alone


def hot_key_and_ranking(candidates: list[Candidate]) -> tuple[str, list[str]]:
    key = KEYS[7]
    return key, sorted((c.url for c in candidates), key=lambda u: weight(key, u), reverse=True)


def test_bounded_load_passes_over_an_overloaded_pod_and_returns_when_load_falls() -> None:
    idle = pods(4)
    key, by_weight = hot_key_and_ranking(idle)
    top, second = by_weight[0], by_weight[1]
    assert rendezvous_pick([key], idle) == top

    def with_load(url: str, load: int) -> list[Candidate]:
        return [Candidate(c.url, load if c.url == url else 1) for c in idle]

    # The others hold 1 each; the ceiling is ceil(1.25 * (3 + load + 1) / 4).
    assert rendezvous_pick([key], with_load(top, 1)) == top  # 2 <= ceil(1.5625) = 2
    assert rendezvous_pick([key], with_load(top, 2)) == second  # 3 > ceil(1.875) = 2
    assert rendezvous_pick([key], with_load(top, 9)) == second  # 10 > ceil(4.0625) = 5
    assert rendezvous_rank([key], with_load(top, 9))[-1] == top  # the last resort
    assert rendezvous_pick([key], with_load(top, 1)) == top  # its load fell: back home


@pytest.mark.parametrize(
    ("top_load", "other_load", "epsilon", "kept"),
    [
        # 4 pods; the ceiling is ceil((1 + e) * (top + 3 * other + 1) / 4); the top pod
        # keeps the request while top + 1 <= ceiling ("exceeds" is strict).
        (0, 0, 0.0, True),  # idle: ceil(0.25) = 1, 1 <= 1
        (1, 0, 0.0, False),  # ceil(0.5) = 1 < 2: even one request in flight is too many
        (1, 1, 0.0, True),  # ceil(1.25) = 2: perfectly even load
        (2, 1, 0.0, False),  # ceil(1.5) = 2 < 3
        (2, 1, 0.5, True),  # ceil(2.25) = 3: epsilon buys room
        (3, 1, 0.5, False),  # ceil(2.625) = 3 < 4
        (3, 1, 1.0, True),  # ceil(3.5) = 4
        (100, 0, 3.0, True),  # ceil(4 * 101 / 4) = 101: epsilon = n - 1 never binds alone
        (100, 0, math.inf, True),  # no bound at all
        (1000, 0, 1e9, True),
    ],
)
def test_epsilon_at_the_edges(top_load: int, other_load: int, epsilon: float, kept: bool) -> None:
    idle = pods(4)
    key, by_weight = hot_key_and_ranking(idle)
    loaded = [Candidate(c.url, top_load if c.url == by_weight[0] else other_load) for c in idle]
    picked = rendezvous_pick([key], loaded, epsilon)
    assert (picked == by_weight[0]) is kept
    if not kept:
        assert picked == by_weight[1]


@given(
    loads=st.lists(st.integers(0, 50), min_size=1, max_size=12),
    epsilon=st.sampled_from([0.0, 0.1, 0.25, 1.0]),
)
def test_some_pod_is_always_within_the_ceiling(loads: list[int], epsilon: float) -> None:
    candidates = [Candidate(f"http://p{i}", load) for i, load in enumerate(loads)]
    ceiling = load_ceiling(candidates, epsilon)
    chosen = rendezvous_pick(["k"], candidates, epsilon)
    assert next(c for c in candidates if c.url == chosen).load + 1 <= ceiling


@pytest.mark.parametrize(
    ("candidates", "epsilon", "message"),
    [
        ([], 0.25, "no candidates"),
        ([Candidate("http://a", 0), Candidate("http://a", 1)], 0.25, "repeat"),
        ([Candidate("http://a", -1)], 0.25, "negative"),
        ([Candidate("http://a", 0)], -0.1, "epsilon"),
        ([Candidate("http://a", 0)], math.nan, "epsilon"),
    ],
)
def test_bad_input_is_refused(candidates: list[Candidate], epsilon: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        rendezvous_pick(["k"], candidates, epsilon)


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(2, 9),
    removed=st.integers(0, 8),
    keys=st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=60, unique=True),
)
def test_property_only_the_removed_pods_keys_move(n: int, removed: int, keys: list[str]) -> None:
    candidates = pods(n)
    gone = candidates[removed % n].url
    remaining = [c for c in candidates if c.url != gone]
    for key in keys:
        before = rendezvous_pick([key], candidates)
        after = rendezvous_pick([key], remaining)
        assert after == before or before == gone


IMAGE = 151655  # Qwen3-VL's image pad token id


@pytest.mark.parametrize(
    ("turn", "same"),
    [
        # (a later prompt, whether it shares the first turn's key)
        ([1, 2, 3, IMAGE, IMAGE, IMAGE, 4, 5, 9, 9, 9], True),  # follow-up turn
        ([1, 2, 3, IMAGE, IMAGE, IMAGE, 7], True),  # other text after the image
        ([1, 2, 3, IMAGE, IMAGE, IMAGE, IMAGE, 4], False),  # a bigger first image
        ([1, 2, 8, IMAGE, IMAGE, IMAGE, 4], False),  # other text before it
        ([1, 2, 3, IMAGE, IMAGE, 4], False),
    ],
)
def test_conversation_key_is_the_prefix_through_the_first_image(
    turn: list[int], same: bool
) -> None:
    first = conversation_key([1, 2, 3, IMAGE, IMAGE, IMAGE, 4], IMAGE, ["a" * 64])
    assert first is not None
    assert (conversation_key(turn, IMAGE, ["a" * 64, "b" * 64]) == first) is same


def test_conversation_key_tells_images_apart_and_skips_text_only() -> None:
    ids = [1, IMAGE, IMAGE, 2]
    assert conversation_key(ids, IMAGE, ["a" * 64]) != conversation_key(ids, IMAGE, ["b" * 64])
    assert conversation_key([1, 2, 3], IMAGE, []) is None
    assert conversation_key((1, IMAGE, 2), IMAGE, ["a"]) == conversation_key(
        [1, IMAGE, 2], IMAGE, ["a"]
    )
    with pytest.raises(ValueError, match="no image keys"):
        conversation_key(ids, IMAGE, [])


def test_conversation_key_routes_language_pods() -> None:
    language = [Candidate(f"http://language-{i}:8000", 0) for i in range(3)]
    key = conversation_key([5, IMAGE, IMAGE, 6], IMAGE, ["c" * 64])
    assert key is not None
    home = rendezvous_pick([key], language)
    follow_up = conversation_key([5, IMAGE, IMAGE, 6, 7, 8, IMAGE, 9], IMAGE, ["c" * 64, "d" * 64])
    assert follow_up == key
    assert rendezvous_pick([follow_up], language) == home
