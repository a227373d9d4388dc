"""The bearer token cache of a web process (the fast tier; the API tests cover tokens end to
end: a valid token works, an unknown one gets 401 / close 4401)."""

from __future__ import annotations

from web.auth import TokenCache


def test_a_known_token_is_answered_from_the_cache() -> None:
    cache = TokenCache(ttl_s=30)
    assert cache.get("h1") is None
    cache.put("h1", "user-1")
    assert cache.get("h1") == "user-1"
    assert cache.get("h2") is None


def test_an_entry_past_its_time_is_not_used() -> None:
    cache = TokenCache(ttl_s=-1)  # every entry is already stale
    cache.put("h1", "user-1")
    assert cache.get("h1") is None


def test_a_full_cache_starts_over() -> None:
    cache = TokenCache(ttl_s=30, max_size=2)
    cache.put("h1", "u1")
    cache.put("h2", "u2")
    cache.put("h3", "u3")
    assert (cache.get("h1"), cache.get("h2"), cache.get("h3")) == (None, None, "u3")
