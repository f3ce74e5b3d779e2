"""Fixtures shared by the WireGuard tests: throwaway keys and an in-memory responder."""

from __future__ import annotations

import os

import pytest

from probes.protocols import wireguard as wg
from tests.wireguard.wg_responder import Responder


@pytest.fixture
def keys() -> dict[str, bytes]:
    return {"server": os.urandom(32), "client": os.urandom(32), "psk": os.urandom(32)}


@pytest.fixture
def responder(keys: dict[str, bytes]) -> Responder:
    return Responder(keys["server"], wg.public_key(keys["client"]), keys["psk"])


@pytest.fixture
def initiator(keys: dict[str, bytes]) -> wg.WireGuardInitiator:
    config = wg.InitiatorConfig(keys["client"], wg.public_key(keys["server"]), keys["psk"])
    return wg.WireGuardInitiator(config)
