"""``tunnelwatch mesh replay`` and ``tunnelwatch mesh`` argument handling through the real CLI."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from probes.cli import main
from probes.model import Verdict, encode
from tests.mesh.helpers import obs, write_mesh_config

pytestmark = pytest.mark.mesh


def test_replay_prints_verdict_changes_as_json_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_mesh_config(tmp_path, 2, ["va", "vb", "vc"])
    lines = [
        encode(obs(n, v, n == "n0" or t == 0, at=10.0 + t))
        for t in range(4)
        for v in ("va", "vb", "vc")
        for n in ("n0", "n1")
    ]
    stream = tmp_path / "obs.jsonl"
    stream.write_bytes(b"\n".join(lines) + b"\n")
    assert main(["mesh", "replay", "--config", str(config), "--observations", str(stream)]) == 0
    first = capsys.readouterr().out
    verdicts = [msgspec.json.decode(line, type=Verdict) for line in first.splitlines()]
    assert [(v.node, v.state.value, v.seq) for v in verdicts] == [
        ("n0", "UP", 1),
        ("n1", "UP", 1),
        ("n1", "DOWN", 2),
    ]
    assert main(["mesh", "replay", "--config", str(config), "--observations", str(stream)]) == 0
    assert capsys.readouterr().out == first  # deterministic


def test_replay_and_serve_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_mesh_config(tmp_path, 1, ["va"])
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(encode(obs("n0", "va", True)) + b'\n{"node": "n0", "ok": "yes"}\n')
    assert main(["mesh", "replay", "--config", str(config), "--observations", str(bad)]) == 2
    assert "line 2" in capsys.readouterr().err
    assert (
        main(["mesh", "replay", "--config", str(config), "--observations", str(tmp_path / "none")])
        == 2
    )
    broken = tmp_path / "broken.yaml"
    broken.write_text("agents: []\nnodes: []\n")
    assert main(["mesh", "--config", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "$.agents" in err and "$.nodes" in err
    assert main(["mesh"]) == 2
