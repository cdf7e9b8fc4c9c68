"""Shared test fixtures. Every test runs with the network closed except loopback.

The guard is the one child processes get through tests/netguard/sitecustomize.py; loaded here too,
it covers the test process itself."""
from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("netguard", Path(__file__).parent / "netguard" / "sitecustomize.py")
_spec.loader.exec_module(importlib.util.module_from_spec(_spec))  # patches socket.connect for good


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def dist_env() -> Iterator:
    """One gloo rank in this process; the launcher variables init_distributed sets are put back after.
    (DeepSpeed's cached world group is forgotten by shutdown(), so a later module can build engines.)"""
    from dist_finetune.distributed import init_distributed, shutdown

    saved = {name: os.environ.pop(name, None) for name in DIST_VARS}
    try:
        yield init_distributed(timeout_seconds=120, debug=True)
    finally:
        shutdown()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
