"""router.imageUrlDomains as the router reads it (servers/images.py Allowlist)."""

from __future__ import annotations

import ipaddress

import pytest

from deepstack_runtime.servers.images import Allowlist

RULES = Allowlist.parse(["images.example.com", "*.cdn.example.org", "10.1.0.0/16", "127.0.0.1"])


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("images.example.com", True),
        ("IMAGES.example.com.", True),  # case and a trailing dot do not matter
        ("other.example.com", False),
        ("a.cdn.example.org", True),
        ("a.b.cdn.example.org", True),
        ("cdn.example.org", False),  # *.domain is the names under it
        ("evilcdn.example.org", False),
        ("10.1.2.3", True),
        ("10.2.0.1", False),
        ("127.0.0.1", True),
        ("[::1]", False),
    ],
)
def test_hosts(host: str, allowed: bool) -> None:
    assert RULES.host_allowed(host) is allowed


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("93.184.216.34", True),  # public
        ("10.1.9.9", True),  # private, but its network is listed
        ("10.2.0.1", False),
        ("192.168.1.1", False),
        ("127.0.0.1", True),  # listed
        ("127.0.0.2", False),
        ("169.254.169.254", False),  # link-local: cloud metadata
        ("::1", False),
        ("fd00::1", False),
        ("224.0.0.1", False),  # multicast
    ],
)
def test_addresses(address: str, allowed: bool) -> None:
    assert RULES.address_allowed(ipaddress.ip_address(address)) is allowed


def test_an_empty_list_allows_nothing() -> None:
    rules = Allowlist.parse([])
    assert rules.empty
    assert not rules.host_allowed("images.example.com")


@pytest.mark.parametrize("entry", ["exa mple.com", "*.", "", "http://x.com", "a..b"])
def test_a_bad_entry_is_named(entry: str) -> None:
    with pytest.raises(ValueError, match="is not a host name or network"):
        Allowlist.parse([entry])
