"""Fixtures for the HA tests: a real etcd member on loopback (no lab, no root needed)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from probes.lab.etcd import LoopbackEtcd
from tests.mesh.process import free_port


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[LoopbackEtcd]:
    if shutil.which("etcd") is None:
        pytest.skip("etcd is not installed")
    member = LoopbackEtcd(tmp_path / "etcd", free_port(), free_port())
    member.start()
    try:
        yield member
    finally:
        member.stop()
