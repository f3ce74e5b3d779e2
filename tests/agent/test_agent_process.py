"""`tunnelwatch agent` as a process: SIGKILL while spooling -> the spool survives and drains."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from probes.model import signing

from .helpers import FAST_L4, Receiver, free_port, l4_target, until, write_config

pytestmark = pytest.mark.agent


def _spooled(db: Path) -> tuple[int, int]:
    """(observations, max seq) committed in the spool, read-only from outside the agent."""
    if not db.exists():
        return 0, -1
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            rows, top = conn.execute("SELECT COALESCE(SUM(last_seq - first_seq + 1), 0), "
                                     "COALESCE(MAX(last_seq), -1) FROM chunks").fetchone()
    except sqlite3.OperationalError:  # tables not created yet
        return 0, -1
    return int(rows), int(top)


def _start(cfg: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "probes.cli", "agent", "--config",
                                 str(cfg), "--log-level", "debug"], stdout=out,
                                stderr=subprocess.STDOUT)


def _kill(proc: subprocess.Popen[bytes], sig: int) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, sig)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


async def test_sigkill_while_spooling_then_restart_drains(tmp_path: Path) -> None:
    async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    key = signing.generate_key()
    signing.write_key_file(tmp_path / "mesh.key", key)
    mesh_port = free_port()
    cfg = write_config(
        tmp_path / "agent.yaml", listen=f"127.0.0.1:{free_port()}", tiers=FAST_L4,
        targets=[l4_target(f"node-{i}", port) for i in range(5)],
        mesh={"endpoints": [f"http://127.0.0.1:{mesh_port}"], "key_id": "k1",
              "key_file": "mesh.key", "flush_interval": 0.2},
        vantage="vantage-k")
    db = tmp_path / "state" / "spool.sqlite"
    log = tmp_path / "agent.log"
    receiver = Receiver(key.encode(), "vantage-k")
    proc = _start(cfg, log)
    restarted: subprocess.Popen[bytes] | None = None
    try:
        await until(lambda: _spooled(db)[0] >= 100, 60, "100 spooled observations")
        await asyncio.to_thread(_kill, proc, signal.SIGKILL)  # no chance to flush anything
        rows, top = _spooled(db)
        assert rows >= 100
        await receiver.start(mesh_port)
        restarted = _start(cfg, log)
        await until(lambda: len(receiver.seqs) > top + 50, 60,
                    "the old spool and new observations to arrive")
        # SIGHUP reloads without a restart: a sixth node appears in the reports
        write_config(cfg, listen=f"127.0.0.1:{free_port()}", tiers=FAST_L4,
                     targets=[l4_target(f"node-{i}", port) for i in range(6)],
                     mesh={"endpoints": [f"http://127.0.0.1:{mesh_port}"], "key_id": "k1",
                           "key_file": "mesh.key", "flush_interval": 0.2},
                     vantage="vantage-k")
        os.kill(restarted.pid, signal.SIGHUP)
        await until(lambda: "reloaded" in log.read_text(), 30, "the reload log line")
        mark = len(receiver.seqs)
        await until(lambda: len(receiver.seqs) > mark + 60, 60, "reports after the reload")
        await asyncio.to_thread(_kill, restarted, signal.SIGTERM)  # graceful: drains
        assert restarted.returncode == 0, log.read_text()[-2000:]
    finally:
        await asyncio.to_thread(_kill, proc, signal.SIGKILL)
        if restarted is not None:
            await asyncio.to_thread(_kill, restarted, signal.SIGKILL)
        await receiver.stop()
        server.close()
    seqs = sorted(receiver.seqs)
    assert len(seqs) == len(set(seqs)), "an observation arrived twice"
    assert seqs == list(range(len(seqs))), "a gap: an observation was lost"
    assert set(range(top + 1)) <= set(seqs)  # everything spooled before the kill arrived
    assert _spooled(db)[0] == 0  # the graceful stop left nothing behind
    assert restarted.pid > 0 and "6 checks on 6 targets" in log.read_text()
