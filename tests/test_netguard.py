"""The network guard every test (and every process a test starts) runs under."""
from __future__ import annotations

import socket

import pytest


def test_non_loopback_connections_are_refused():
    with pytest.raises(OSError, match="network disabled in tests"):
        socket.create_connection(("192.0.2.1", 53), timeout=1)  # TEST-NET-1: never routed


def test_loopback_still_works():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(server.getsockname(), timeout=5):
            pass
