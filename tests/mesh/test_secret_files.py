"""Key and token files (issue #17, item 9): accepted world-readable, empty or 5 bytes long,
``check-config`` said ok and the mesh then died with a traceback (an empty operator token made
the admin API answer 401 forever). Now ``check-config`` and every start refuse them with one
line naming the file and what to do."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from probes.cli import main
from probes.model import signing
from tests.mesh.helpers import write_mesh_config
from tests.mesh.process import free_port

pytestmark = pytest.mark.mesh


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The real CLI in a process of its own (what an operator runs)."""
    return subprocess.run([sys.executable, "-m", "probes.cli", *args], capture_output=True,
                          text=True, timeout=60, check=False)


def _main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """The same CLI entry point, in this process (fast)."""
    code = main(list(args))
    return code, capsys.readouterr().err


BAD: dict[str, Callable[[Path], None]] = {
    "world-readable": lambda p: p.chmod(0o644),
    "group-readable": lambda p: p.chmod(0o640),
    "empty": lambda p: p.write_bytes(b"\n"),
    "5 bytes": lambda p: p.write_bytes(b"abcde"),
}


@pytest.mark.parametrize("spoil", list(BAD))
@pytest.mark.parametrize("which", ["va.key", "token"])
def test_check_config_and_start_refuse_bad_key_files(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], which: str, spoil: str) -> None:
    config = write_mesh_config(tmp_path, 2, ["va"], port=free_port())
    assert _main(capsys, "check-config", str(config))[0] == 0
    BAD[spoil](tmp_path / which)
    field = "$.agents[0].key_file" if which == "va.key" else "$.operator_token_file"
    for command in (["check-config", str(config)], ["mesh", "--config", str(config)]):
        code, err = _main(capsys, *command)
        assert code == 2 and field in err and str(tmp_path / which) in err, err
        assert ("chmod 600" in err) == spoil.endswith("readable")


def test_a_bad_key_stops_a_real_start_with_one_line(tmp_path: Path) -> None:
    config = write_mesh_config(tmp_path, 2, ["va"], port=free_port())
    (tmp_path / "token").write_bytes(b"\n")  # an empty token: the admin API answered 401 forever
    started = _cli("mesh", "--config", str(config))
    assert started.returncode == 2
    assert "Traceback" not in started.stderr and len(started.stderr.strip().splitlines()) == 2
    assert "$.operator_token_file" in started.stderr and "holds 0 bytes" in started.stderr


def test_a_key_spoiled_after_the_check_still_stops_the_start_with_one_line(
        tmp_path: Path) -> None:
    key = signing.write_key_file(tmp_path / "k.key", signing.generate_key())
    assert signing.load_key(key)
    key.chmod(0o604)
    with pytest.raises(signing.KeyFileError) as info:
        signing.load_key(key)
    assert str(info.value) == (f"key file {key} is open to the group or others (mode 0604): "
                               f"chmod 600 {key}")
    assert "\n" not in str(info.value)


def test_keygen_secret_writes_a_key_only_its_owner_reads(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "hook.key"
    assert _main(capsys, "keygen", "secret", str(out))[0] == 0
    assert out.stat().st_mode & 0o777 == 0o600 and len(signing.load_key(out)) == 64
    assert _main(capsys, "keygen", "secret", str(out))[0] == 2  # never silently replaced
    os.chmod(out, 0o644)
    assert _main(capsys, "keygen", "secret", "--force", str(out))[0] == 0
    assert out.stat().st_mode & 0o777 == 0o600


def test_agent_and_receiver_configs_refuse_them_too(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "mesh.key"
    key.write_text(signing.generate_key())  # the umask's 644
    agent = tmp_path / "agent.yaml"
    agent.write_text(
        "agent: {vantage: va, listen: '127.0.0.1:9470'}\n"
        "targets:\n  - {id: n0, pool: p, pop: x, region: eu, address: 127.0.0.1,"
        " l4: {tcp_ports: [1]}}\n"
        f"mesh: {{endpoints: ['http://127.0.0.1:1'], key_id: va, key_file: {key}}}\n")
    code, err = _main(capsys, "check-config", str(agent))
    assert code == 2 and "$.mesh.key_file" in err
    receiver = tmp_path / "receiver.yaml"
    receiver.write_text(f"keys:\n  - {{key_id: k1, key_file: {key}}}\n")
    code, err = _main(capsys, "receiver", "--config", str(receiver), "--check")
    assert code == 2 and "$.keys[0].key_file" in err
    key.chmod(0o600)
    assert _main(capsys, "check-config", str(agent))[0] == 0
    assert _main(capsys, "receiver", "--config", str(receiver), "--check")[0] == 0
