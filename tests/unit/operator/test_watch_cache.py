"""The watch cache's merge of lists and watch events (pure logic, no API server)."""

from __future__ import annotations

from typing import Any

from deepstack_operator import names
from deepstack_operator.kube import WatchCache

NS, OWNER = "ns", "demo"


def obj(name: str, version: int) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": NS,
            "resourceVersion": str(version),
            "labels": {names.INSTANCE_LABEL: OWNER},
        }
    }


def held(cache: WatchCache) -> dict[str, str]:
    found = cache.lookup("ConfigMap", NS, OWNER)
    assert found is not None
    return {o["metadata"]["name"]: o["metadata"]["resourceVersion"] for o in found}


def test_nothing_is_served_before_a_list_or_after_the_resync_period() -> None:
    cache = WatchCache(resync_seconds=0.0)
    cache.seen("ConfigMap", obj("a", 5))
    assert cache.lookup("ConfigMap", NS, OWNER) is None
    cache.listed("ConfigMap", NS, OWNER, [obj("a", 5)], version=5)
    assert cache.lookup("ConfigMap", NS, OWNER) is None  # already due again


def test_a_lost_deletion_is_made_good_by_the_next_list() -> None:
    cache = WatchCache()
    cache.listed("ConfigMap", NS, OWNER, [obj("a", 5), obj("b", 7)], version=7)
    # b is deleted, but its DELETED event never arrives; the next list no longer has it.
    cache.listed("ConfigMap", NS, OWNER, [obj("a", 5)], version=9)
    assert held(cache) == {"a": "5"}
    cache.listed("ConfigMap", NS, OWNER, [], version=10)
    assert held(cache) == {}


def test_an_object_created_after_the_list_was_taken_stays() -> None:
    cache = WatchCache()
    cache.seen("ConfigMap", obj("new", 12))
    cache.listed("ConfigMap", NS, OWNER, [obj("a", 5)], version=10)
    assert held(cache) == {"a": "5", "new": "12"}


def test_a_newer_event_wins_over_a_list_and_an_older_event_loses() -> None:
    cache = WatchCache()
    cache.seen("ConfigMap", obj("a", 12))
    cache.listed("ConfigMap", NS, OWNER, [obj("a", 5)], version=10)
    assert held(cache) == {"a": "12"}
    cache.seen("ConfigMap", obj("a", 8))
    assert held(cache) == {"a": "12"}


def test_a_deletion_is_not_undone_by_an_older_list_and_its_tombstone_goes() -> None:
    cache = WatchCache()
    cache.listed("ConfigMap", NS, OWNER, [obj("a", 5)], version=5)
    cache.seen("ConfigMap", obj("a", 9), deleted=True)
    cache.listed("ConfigMap", NS, OWNER, [obj("a", 5)], version=8)  # taken before it
    assert held(cache) == {}
    cache.listed("ConfigMap", NS, OWNER, [], version=11)
    assert cache._deleted == {}
