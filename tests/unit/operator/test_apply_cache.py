"""When the operator may skip asking the server whether an apply would change anything."""

from __future__ import annotations

from deepstack_operator.kube import _metadata_holds, _version

WANT = {
    "metadata": {
        "labels": {"a": "1"},
        "annotations": {"n": "x"},
        "ownerReferences": [{"uid": "u1"}],
    }
}


def test_a_status_update_is_not_a_change_but_a_spec_update_is() -> None:
    assert _version({"metadata": {"generation": 3, "resourceVersion": "10"}}) == (
        _version({"metadata": {"generation": 3, "resourceVersion": "11"}})
    )
    assert _version({"metadata": {"generation": 3}}) != _version({"metadata": {"generation": 4}})
    # Kinds without a generation (ConfigMap): any write counts.
    assert _version({"metadata": {"resourceVersion": "10"}}) != (
        _version({"metadata": {"resourceVersion": "11"}})
    )


def test_edited_metadata_is_noticed_though_no_generation_moved() -> None:
    live = {"metadata": {**WANT["metadata"], "labels": {"a": "1", "extra": "kept"}}}
    assert _metadata_holds(WANT, live)
    assert not _metadata_holds(WANT, {"metadata": {**WANT["metadata"], "labels": {"a": "2"}}})
    assert not _metadata_holds(WANT, {"metadata": {**WANT["metadata"], "annotations": {}}})
    assert not _metadata_holds(WANT, {"metadata": {**WANT["metadata"], "ownerReferences": []}})
