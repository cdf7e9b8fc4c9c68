"""Loaded by child processes the tests start (PYTHONPATH): refuses and records any connection
to a non-loopback address, so a test can assert that a real run touched no network."""
import ipaddress
import os
import socket

_log = os.environ.get("NETGUARD_LOG")
_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


def _loopback(address) -> bool:
    if not isinstance(address, tuple):
        return True
    host = address[0]
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _guard(real):
    def connect(sock, address):
        if not _loopback(address):
            if _log:
                with open(_log, "a") as f:
                    f.write(f"{os.getpid()} {address!r}\n")
            raise OSError(f"network disabled in tests: {address!r}")
        return real(sock, address)

    return connect


socket.socket.connect = _guard(_real_connect)
socket.socket.connect_ex = _guard(_real_connect_ex)
