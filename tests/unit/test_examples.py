"""Every shipped example config passes `tunnelwatch check-config` after the one documented step
(`tunnelwatch keygen secrets FILE`: throwaway keys for the key files it names). The shipped mesh
example used to fail its own check, and no document said how to create its keys."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from probes.cli import main

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"
SHIPPED = sorted(p.name for p in EXAMPLES.glob("*.yaml"))


def test_there_are_examples_to_check() -> None:
    assert {"agent.yaml", "mesh.yaml"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_example_passes_check_config_after_the_documented_key_step(
        name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "examples"
    shutil.copytree(EXAMPLES, copy)
    example = copy / name
    step = f"tunnelwatch keygen secrets docs/examples/{name}"
    if "keygen secrets" in example.read_text():  # the file names the step it needs
        assert step in example.read_text()
        assert main(["keygen", "secrets", str(example)]) == 0
    capsys.readouterr()
    assert main(["check-config", str(example)]) == 0, capsys.readouterr().err
    assert ": ok (" in capsys.readouterr().out
    assert main(["keygen", "secrets", str(example)]) == 0  # nothing missing: nothing written
    assert "wrote" not in capsys.readouterr().out


def test_keygen_secrets_writes_only_missing_files_and_reports_other_problems(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copy(EXAMPLES / "mesh.yaml", tmp_path / "mesh.yaml")
    (tmp_path / "keys").mkdir()
    kept = tmp_path / "keys" / "operator.token"
    kept.write_text("x" * 64)
    kept.chmod(0o600)
    assert main(["keygen", "secrets", str(tmp_path / "mesh.yaml")]) == 0
    out = capsys.readouterr().out
    assert "operator.token" not in out and out.count("wrote") == 3
    assert kept.read_text() == "x" * 64
    for key in (tmp_path / "keys").iterdir():
        assert key.stat().st_mode & 0o777 == 0o600
    text = (tmp_path / "mesh.yaml").read_text().replace("listen: 127.0.0.1:9480",
                                                         "listen: 127.0.0.1")
    (tmp_path / "mesh.yaml").write_text(text)
    assert main(["keygen", "secrets", str(tmp_path / "mesh.yaml")]) == 2
    assert "$.listen" in capsys.readouterr().err
