"""`tunnelwatch check-config`: good files pass, each kind of mistake is named by field and line."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from probes.cli import main
from probes.config import ConfigError, load_agent_config

PUB = "FwKINukK1Ae76spOI8o4/YWh/97FYXTminOTUkE6cR0="

GOOD = """\
agent:
  vantage: fra-hetzner
  asn: 24940
  region: eu-central
targets:
  - id: fra1-node1
    pool: fra1
    pop: fra1
    region: eu-central
    address: 10.77.1.2
    wireguard:
      server_public_key: {pub}
      private_key_file: agent.key
      tunnel_address: 10.201.0.2/32
      canary: 10.201.0.1
    openvpn:
      proto: udp
      ca_file: ca.crt
      cert_file: agent.crt
      key_file: agent.key
      tls_crypt_file: tc.key
    l4:
      tcp_ports: [443]
tiers:
  l4: {{interval: 2, timeout: 1, fast_interval: 0.5}}
"""


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    for name in ("agent.key", "ca.crt", "agent.crt", "tc.key"):
        (tmp_path / name).write_text("x\n")
    return tmp_path


def write(config_dir: Path, text: str) -> Path:
    path = config_dir / "agent.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_good_config_loads(config_dir: Path) -> None:
    cfg = load_agent_config(write(config_dir, GOOD.format(pub=PUB)))
    assert cfg.agent.vantage == "fra-hetzner"
    assert cfg.targets[0].wireguard is not None
    assert cfg.tiers["l4"].fast_interval == 0.5
    assert "functional" in cfg.tiers or cfg.tiers.keys() == {"l4"}


def test_check_config_exit_codes(config_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(write(config_dir, GOOD.format(pub=PUB)))]) == 0
    assert "ok" in capsys.readouterr().out
    bad = write(config_dir, GOOD.format(pub=PUB).replace("asn: 24940", "asn: many"))
    assert main(["check-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "$.agent.asn" in err and "line 3" in err


# (mutation of the good file, field path expected in the message, words expected in the message)
BAD_CASES = [
    pytest.param(("asn: 24940", "asn: lots"), "$.agent.asn", "Expected `int`",
                 id="wrong-type"),
    pytest.param(("  region: eu-central\ntargets", "  regoin: eu-central\ntargets"),
                 "$.agent.regoin (line 4)", "unknown key `regoin` (did you mean `region`?)",
                 id="unknown-key"),
    pytest.param(("private_key_file: agent.key", "private_key_file: missing.key"),
                 "$.targets[0].wireguard.private_key_file", "file not found",
                 id="missing-key-file"),
    pytest.param(("address: 10.77.1.2", "address: 10.77.1.2.9/x"), "$.targets[0].address",
                 "expected an IP address or hostname", id="bad-address"),
    pytest.param(("{interval: 2, timeout: 1,", "{interval: 1, timeout: 1,"),
                 "$.tiers.l4.interval", "must be longer than timeout",
                 id="interval-not-above-timeout"),
    pytest.param(("server_public_key: " + PUB, "server_public_key: not-a-key"),
                 "$.targets[0].wireguard.server_public_key", "base64", id="bad-wg-key"),
    pytest.param(("      tls_crypt_file: tc.key",
                  "      tls_crypt_file: tc.key\n      tls_auth_file: tc.key"),
                 "$.targets[0].openvpn", "at most one control-channel wrapping",
                 id="two-openvpn-wrappings"),
    pytest.param(("tunnel_address: 10.201.0.2/32", "tunnel_address: 10.201.0.300/32"),
                 "$.targets[0].wireguard.tunnel_address", "expected an address with prefix",
                 id="bad-tunnel-address"),
    pytest.param(("    pool: fra1\n", ""), "$.targets[0].pool", "required key missing",
                 id="missing-required"),
    pytest.param(("    l4:\n", "    checks: [wireguard.handshake, smtp]\n    l4:\n"),
                 "$.targets[0].checks[1]", "unknown check kind or protocol 'smtp'",
                 id="unknown-check-kind"),
    pytest.param(("    l4:\n", "    checks: [tcp:25]\n    l4:\n"),
                 "$.targets[0].checks[0]", "port 25 is not in this target's l4 tcp ports",
                 id="check-port-not-probed"),
    pytest.param(("vantage: fra-hetzner", "vantage: fra-hetzner\n  listen: 127.0.0.1"),
                 "$.agent.listen", "expected HOST:PORT", id="listen-without-port"),
    pytest.param(("{interval: 2, timeout: 1,", "{interval: 2x, timeout: 1,"),
                 "$.tiers.l4.interval", "a duration like 500ms, 2s or 1m30s, got '2x'",
                 id="bad-duration"),
    pytest.param(("tcp_ports: [443]", "tcp_ports: [70000]"), "$.targets[0].l4.tcp_ports[0]",
                 "port must be 1..65535", id="port-range"),
    pytest.param(("proto: udp", "proto: sctp"), "$.targets[0].openvpn.proto",
                 "Invalid enum value 'sctp'", id="bad-enum"),
    pytest.param(("vantage: fra-hetzner", "vantage: 'fra hetzner'"), "$.agent.vantage",
                 "short name", id="bad-vantage-name"),
    pytest.param(("    l4:\n", "    telemetry: {ssh: {port: 22}}\n    l4:\n"),
                 "$.targets[0].telemetry", "nothing to read", id="telemetry-reads-nothing"),
    pytest.param(("    l4:\n", "    telemetry: {wireguard_interface: wg/0}\n    l4:\n"),
                 "$.targets[0].telemetry.wireguard_interface", "expected an interface name",
                 id="telemetry-bad-interface"),
    pytest.param(("    l4:\n", "    telemetry: {ikev2: true, ssh: {key_file: no.key}}\n"
                                 "    l4:\n"),
                 "$.targets[0].telemetry.ssh.key_file", "file not found",
                 id="telemetry-missing-ssh-key"),
    pytest.param(("    l4:\n", "    telemetry: {ikev2_vici_uri: 'unix:///x'}\n    l4:\n"),
                 "$.targets[0].telemetry.ikev2_vici_uri", "only applies with ikev2",
                 id="telemetry-vici-without-ikev2"),
    pytest.param(("tiers:\n", "tiers:\n  telemetry: {interval: 5, timeout: 9}\n"),
                 "$.tiers.telemetry.interval", "must be longer than timeout",
                 id="telemetry-tier"),
]


@pytest.mark.parametrize(("mutation", "path", "words"), BAD_CASES)
def test_bad_configs_name_the_field(config_dir: Path, mutation: tuple[str, str], path: str,
                                   words: str, capsys: pytest.CaptureFixture[str]) -> None:
    good = GOOD.format(pub=PUB)
    assert mutation[0] in good, "test mutation no longer applies"
    file = write(config_dir, good.replace(mutation[0], mutation[1], 1))
    with pytest.raises(ConfigError) as info:
        load_agent_config(file)
    messages = [str(p) for p in info.value.problems]
    assert any(path in m and words in m for m in messages), messages
    assert all(p.line is not None for p in info.value.problems), "every problem has a line"
    assert main(["check-config", str(file)]) == 2
    assert path in capsys.readouterr().err


def test_duplicate_node_id(config_dir: Path) -> None:
    good = GOOD.format(pub=PUB)
    target = good[good.index("  - id:"):good.index("tiers:")]
    file = write(config_dir, good.replace("tiers:", target + "tiers:", 1))
    with pytest.raises(ConfigError) as info:
        load_agent_config(file)
    problem = info.value.problems[0]
    assert problem.path == "$.targets[1].id"
    assert "duplicate node id 'fra1-node1'" in problem.message
    assert problem.line == good.count("\n", 0, good.index("tiers:")) + 1


def test_not_yaml_and_not_a_mapping(config_dir: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_agent_config(write(config_dir, "agent: [unclosed\n"))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_agent_config(write(config_dir, "- just\n- a list\n"))
    with pytest.raises(ConfigError, match="cannot read file"):
        load_agent_config(config_dir / "absent.yaml")


def test_every_problem_is_reported_at_once(config_dir: Path) -> None:
    good = GOOD.format(pub=PUB)
    text = (good.replace("private_key_file: agent.key", "private_key_file: nope.key")
                .replace("tcp_ports: [443]", "tcp_ports: [0]"))
    with pytest.raises(ConfigError) as info:
        load_agent_config(write(config_dir, text))
    assert {p.path for p in info.value.problems} >= {
        "$.targets[0].wireguard.private_key_file", "$.targets[0].l4.tcp_ports[0]"}


def test_shipped_example_is_valid() -> None:
    # the agent example ships runnable: sections that need key files are commented out
    example = Path(__file__).resolve().parents[2] / "docs" / "examples" / "agent.yaml"
    config = load_agent_config(example)
    assert config.targets and all(t.l4 is not None for t in config.targets)


def test_durations_take_prometheus_strings_and_numbers(config_dir: Path) -> None:
    text = GOOD.format(pub=PUB).replace("{interval: 2, timeout: 1, fast_interval: 0.5}",
                                        "{interval: 1m30s, timeout: 2s, fast_interval: 500ms}")
    cfg = load_agent_config(write(config_dir, text))
    l4 = cfg.tiers["l4"]
    assert (l4.interval, l4.timeout, l4.fast_interval) == (90.0, 2.0, 0.5)
    assert isinstance(l4.interval, float)
    text = text.replace("timeout: 2s", "timeout: 2")  # numbers still are seconds
    assert load_agent_config(write(config_dir, text)).tiers["l4"].timeout == 2.0


def test_every_problem_is_reported_once_at_the_offending_keys_line(config_dir: Path) -> None:
    """Three type errors and a misspelt key deep in the file: four problems, each once, each
    at its own key's line (a misspelt key used to be reported at its parent's line, and only
    the first problem of a file at all)."""
    text = (GOOD.format(pub=PUB)
            .replace("asn: 24940", "asn: lots")  # line 3
            .replace("canary: 10.201.0.1", "canary: 10.201.0.1\n      echo_count: many")
            .replace("tcp_ports: [443]", "tcp_ports: [443]\n      icmp: sometimes")
            + "paths:\n  enabled: true\n  max_tll: 30\n")
    lines = text.splitlines()
    file = write(config_dir, text)
    with pytest.raises(ConfigError) as info:
        load_agent_config(file)
    found = {(p.path, p.line) for p in info.value.problems}
    assert len(found) == len(info.value.problems) == 4, info.value.problems
    for path, line in found:
        key = path.rsplit(".", 1)[-1]
        assert lines[line - 1].lstrip().startswith(f"{key}:"), (path, line, lines[line - 1])
    assert {p for p, _ in found} == {"$.agent.asn", "$.targets[0].wireguard.echo_count",
                                     "$.targets[0].l4.icmp", "$.paths.max_tll"}
