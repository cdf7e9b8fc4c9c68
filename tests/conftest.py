"""Shared test fixtures. Every test runs with the network closed except loopback.

The guard is the one child processes get through tests/netguard/sitecustomize.py; loaded here too,
it covers the test process itself."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("netguard", Path(__file__).parent / "netguard" / "sitecustomize.py")
_spec.loader.exec_module(importlib.util.module_from_spec(_spec))  # patches socket.connect for good


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
