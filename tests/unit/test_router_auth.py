"""The router's API keys (servers/auth.py): the check, and the key file re-read."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from deepstack_runtime.servers.auth import ApiKeyError, ApiKeys, authorized, parse_api_keys

KEYS = parse_api_keys("alpha\n\n  beta \n")


def test_keys_are_one_per_line_and_blank_lines_do_not_count() -> None:
    assert parse_api_keys("alpha\n\n  beta \n") == {"alpha", "beta"}
    assert parse_api_keys("\n\n") == frozenset()


@pytest.mark.parametrize(
    ("header", "allowed"),
    [
        ("Bearer alpha", True),
        ("bearer beta", True),
        ("Bearer alphabet", False),
        ("Bearer ", False),
        ("Basic alpha", False),
        ("alpha", False),
        (None, False),
    ],
)
def test_authorized(header: str | None, allowed: bool) -> None:
    assert authorized(header, KEYS) is allowed


def test_no_key_file_means_no_authentication() -> None:
    assert ApiKeys.load("").allows(None)


@pytest.mark.parametrize("text", [None, "", "\n  \n"])
def test_a_key_file_that_is_missing_or_blank_stops_the_router(
    tmp_path: Path, text: str | None
) -> None:
    path = tmp_path / "keys"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ApiKeyError, match=r"no key|cannot read"):
        ApiKeys.load(str(path))


def replace(path: Path, text: str) -> None:
    """As the kubelet updates a Secret volume: a new file moved into place."""
    new = path.with_name(".new")
    new.write_text(text)
    os.replace(new, path)


def test_a_rotated_key_file_is_read_again_and_a_blank_one_refuses_everything(
    tmp_path: Path,
) -> None:
    path = tmp_path / "keys"
    path.write_text("old\n")
    keys = ApiKeys.load(str(path))
    assert keys.allows("Bearer old")
    replace(path, "new\n")
    keys.refresh()
    assert keys.allows("Bearer new")
    assert not keys.allows("Bearer old")
    replace(path, "\n")  # emptied: closed, not open
    keys.refresh()
    assert not keys.allows("Bearer new")
    assert not keys.allows(None)
    assert "holds no key" in keys.problem
    path.unlink()
    keys.refresh()
    assert not keys.allows("Bearer new")
    replace(path, "again\n")
    keys.refresh()
    assert keys.allows("Bearer again")
    assert keys.problem == ""
