"""The per-address key of the admission caps (the caps themselves run against a
real server in tests/e2e/test_slow_clients.py)."""

from __future__ import annotations

import pytest

from roost.gateway.admission import address_key, default_max_pending


def test_ipv4_is_its_own_address() -> None:
    assert address_key(("203.0.113.7", 51000)) == "203.0.113.7"
    assert address_key(("203.0.113.7", 1)) != address_key(("203.0.113.8", 1))


def test_ipv6_counts_per_64() -> None:
    """One host gets a whole /64: counting single IPv6 addresses would not cap it."""
    a = address_key(("2001:db8:1:2::1", 443, 0, 0))
    b = address_key(("2001:db8:1:2:ffff:ffff:ffff:ffff", 443, 0, 0))
    c = address_key(("2001:db8:1:3::1", 443, 0, 0))
    assert a == b == "2001:db8:1:2::/64"
    assert c != a


def test_ipv4_mapped_ipv6_is_the_ipv4_address() -> None:
    assert address_key(("::ffff:203.0.113.7", 1, 0, 0)) == "203.0.113.7"


def test_unknown_peer_is_one_shared_key() -> None:
    assert address_key(None) == address_key("") == ""


def test_default_cap_is_a_quarter_of_the_file_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    import resource

    for soft, expected in ((1024, 256), (20_000, 1024), (40, 16), (resource.RLIM_INFINITY, 1024)):
        monkeypatch.setattr(resource, "getrlimit", lambda _which, soft=soft: (soft, soft))
        assert default_max_pending() == expected
