"""The router's API-key check (servers/router.py), as pure functions."""

from __future__ import annotations

import pytest

from deepstack_runtime.servers.router import authorized, parse_api_keys

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


def test_no_keys_means_no_authentication() -> None:
    assert authorized(None, frozenset())
