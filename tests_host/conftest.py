"""pytest fixtures shared by all tests."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

from util import run_mpy  # noqa: E402

# tests_host/ha/ runs in its own environment with Home Assistant (make test-ha)
collect_ignore = ["ha"]


@pytest.fixture
def mpy():
    """Run a snippet on the micropython binary: mpy(code, heap='100K')."""
    return run_mpy


@pytest.fixture
def broker(tmp_path):
    """A fresh mosquitto on free loopback ports with a generated CA (TLS + plain)."""
    from broker import Broker
    b = Broker(str(tmp_path / "broker")).start()
    yield b
    b.stop()
