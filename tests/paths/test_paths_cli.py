"""``tunnelwatch paths``: table lookups and the offline localisation of recorded traces."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from probes.cli import main

pytestmark = pytest.mark.paths

DATA = Path(__file__).parent / "data"
TABLE = ["--asn-table", str(DATA / "lab-rib.mrt"), "--asn-names", str(DATA / "lab-asnames.txt"),
         "--local-asn", "64500"]


def test_lookup(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["paths", "lookup", *TABLE, "10.200.1.2", "8.8.8.8", "192.168.0.1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["10.200.1.2\t64510\tAS64510 (transit-1)",
                     "8.8.8.8\tunknown\tan unknown address",
                     "192.168.0.1\tprivate\ta private address"]


def test_localise_recorded_traces(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = [line for line in (DATA / "lab-traces.jsonl").read_text().splitlines()
             if json.loads(line)["phase"] in ("healthy", "mtu-t1")]
    traces = tmp_path / "traces.jsonl"
    traces.write_text("\n".join(lines) + "\n")
    assert main(["paths", "localise", *TABLE, "--traces", str(traces)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["node1"]["network"]["asn"] == 64510
    assert {f["kind"] for f in out["node1"]["vantages"].values()} == {"mtu"}


def test_localise_names_a_bad_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    traces = tmp_path / "traces.jsonl"
    traces.write_text('{"node": "n"}\n')
    assert main(["paths", "localise", "--traces", str(traces)]) == 2
    assert "line 1" in capsys.readouterr().err
