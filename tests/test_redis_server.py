"""ops/redis_server.py: free ports, and a private redis-server that finds its port taken."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from ops.redis_server import EmbeddedRedis, PortTaken, _ephemeral_ports, _share, free_port
from tests.cluster import ClusterNode


@contextmanager
def held(port: int) -> Iterator[None]:
    """Another process's listening socket on ``port`` (as a server that got there first)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()
        yield


def answers(server: EmbeddedRedis) -> bool:
    client = redis.Redis(port=server.port, socket_timeout=2)
    try:
        return bool(client.ping())
    finally:
        client.close()


def test_each_share_is_its_own_part_of_the_range(monkeypatch: pytest.MonkeyPatch) -> None:
    low, _ = _ephemeral_ports()
    monkeypatch.setenv("RELAY_PORT_SHARE", "1/4")
    first, end = _share(10000, low)
    assert (first, end) == (10000 + (low - 10000) // 4, 10000 + 2 * ((low - 10000) // 4))
    picks = {free_port() for _ in range(50)}
    assert all(first <= port < end for port in picks)
    monkeypatch.setenv("RELAY_PORT_SHARE", "nonsense")
    assert _share(10000, low) == (10000, low)
    monkeypatch.setenv("RELAY_PORT_SHARE", "4/4")
    assert _share(10000, low) == (10000, low)


def started_past(server: EmbeddedRedis, taken: int, port: Callable[[], int]) -> None:
    """Start ``server`` while ``taken`` is held: it answers, and ``port()`` moved off it."""
    with held(taken):
        server.start()
        try:
            assert port() != taken
            assert answers(server)
        finally:
            server.stop()


def test_a_chosen_port_taken_before_the_start_is_chosen_again(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path)
    started_past(server, server.port, lambda: server.port)


def test_a_given_port_taken_is_an_error_that_says_so(tmp_path: Path) -> None:
    port = free_port()
    with held(port), pytest.raises(PortTaken, match="already in use"):
        EmbeddedRedis(tmp_path, port=port).start()


def test_a_restart_keeps_the_port_clients_know(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path).start()
    port = server.port
    server.stop()
    with held(port), pytest.raises(PortTaken):
        server.start()
    assert server.port == port
    server.start()
    try:
        assert server.port == port and answers(server)
    finally:
        server.stop()


def test_a_cluster_node_whose_bus_port_is_taken_takes_another(tmp_path: Path) -> None:
    node = ClusterNode(tmp_path)
    started_past(node, node.bus_port, lambda: node.bus_port)


def test_a_port_another_redis_got_to_first_is_not_taken_for_ours(tmp_path: Path) -> None:
    """Two processes picked the same port; the other's Redis bound it first (it answers
    PING there, as ours would): ours must not take it for itself."""
    other = EmbeddedRedis(tmp_path / "other").start()
    try:
        server = EmbeddedRedis(tmp_path / "ours")
        server.port = other.port
        server.start()
        try:
            assert server.port != other.port
            assert server.process is not None
            client = redis.Redis(port=server.port)
            assert int(client.info("server")["process_id"]) == server.process.pid
            client.close()
        finally:
            server.stop()
    finally:
        other.stop()
