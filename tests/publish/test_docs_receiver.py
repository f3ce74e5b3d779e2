"""The 10-line receiver in docs/webhooks.md, run as written against the real webhook publisher."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from probes.mesh.publish.base import RetryableError
from probes.mesh.publish.webhook import WebhookPublisher
from probes.model import Verdict, VerdictState
from probes.model.signing import write_key_file
from tests.publish.helpers import KEY

pytestmark = pytest.mark.publish

DOC = Path(__file__).resolve().parents[2] / "docs" / "webhooks.md"


def snippet() -> str:
    text = DOC.read_text()
    section = text.split("## A 10-line receiver", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code, "no python block in the receiver section"
    return code.group(1)


def test_snippet_is_ten_lines_or_so() -> None:
    assert len(snippet().strip().splitlines()) <= 11


async def test_doc_receiver_verifies_real_deliveries(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    write_key_file(tmp_path / "webhook.key", KEY)
    code = snippet().replace("9490", str(port))
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "doc receiver did not start"
                time.sleep(0.05)
        url = f"http://127.0.0.1:{port}/"
        verdict = Verdict(node="node2", state=VerdictState.DOWN, previous=VerdictState.UP,
                          seq=7, decided_at=time.time())
        good = WebhookPublisher("doc", url, KEY, "k")
        await good.deliver(verdict)  # 204: accepted
        forged = WebhookPublisher("doc", url, b"another-key-of-32-bytes-length!!", "k")
        with pytest.raises(RetryableError, match="401"):  # refused: retried until dead-lettered
            await forged.deliver(verdict)
        await good.close()
        await forged.close()
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    assert out.splitlines() == ["node2:7 DOWN"]
