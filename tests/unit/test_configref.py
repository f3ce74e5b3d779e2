"""The generated configuration reference: up to date, complete, and faithful to the models."""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Annotated, Literal

import msgspec
import pytest

from probes.cli import main
from probes.cli.configref import DEFAULT_OUTPUT
from probes.config import AgentConfig, AgentIdentity, L4Target, OpenVPNTarget, WireGuardTarget
from probes.configref import ConfigFile, config_files, field_comment, render_reference
from probes.mesh.config import MeshConfig

pytestmark = pytest.mark.observability

REFERENCE = Path(__file__).resolve().parents[2] / "docs" / "configuration-reference.md"


# a small model exercising every rendering rule; its comments are the expected descriptions


class Leaf(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A leaf section."""

    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 443  # where it listens
    # the first line above
    # and the second line above
    names: list[str] = msgspec.field(default_factory=list)
    labels: dict[str, float] = msgspec.field(default_factory=dict)
    silent: bool = False
    last: float = 1.5  # trailing on the last field
    # continues the trailing comment


class Alpha(msgspec.Struct, tag="alpha", tag_field="kind", kw_only=True):
    url: str


class Beta(msgspec.Struct, tag="beta", tag_field="kind", kw_only=True):
    leaf: Leaf | None = None


class Sample(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    mode: Literal["fast", "slow"] = "fast"
    leaf: Leaf = msgspec.field(default_factory=Leaf)
    leaves: dict[str, Leaf] = msgspec.field(default_factory=dict)
    plugins: list[Alpha | Beta] = msgspec.field(default_factory=list)
    limit: int | None = None  # the comment of limit
    # a block directly above `name` belongs to `name`, not to `limit`
    name: str


SAMPLE = ConfigFile("sample", "Sample configuration", Sample, "`nothing`")


def _sections(text: str) -> dict[str, dict[str, list[str]]]:
    """Model name -> field -> its row's cells, parsed back from the Markdown."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for line in text.splitlines():
        model = re.match(r"^Model: `([\w.]+)`\.$", line)
        if model:
            current = sections.setdefault(model.group(1), {})
        elif current is not None and line.startswith("| `"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            current[cells[0].strip("`")] = cells[1:]
    return sections


def _row(text: str, model: type, name: str) -> list[str]:
    return _sections(text)[f"{model.__module__}.{model.__qualname__}"][name]


def test_committed_reference_matches_the_models() -> None:
    assert REFERENCE == DEFAULT_OUTPUT
    fresh = render_reference()
    assert REFERENCE.read_text() == fresh, "stale: run `tunnelwatch config-reference`"


def test_check_flag_reports_a_stale_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ref.md"
    assert main(["config-reference", "--check", "--output", str(out)]) == 1
    assert main(["config-reference", "--output", str(out)]) == 0
    assert main(["config-reference", "--check", "--output", str(out)]) == 0
    out.write_text(out.read_text().replace("| `vantage` |", "| `vantage_old` |"))
    capsys.readouterr()
    assert main(["config-reference", "--check", "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert "1 line(s) to add, 1 to remove" in err
    assert "+| `vantage` |" in err


def _structs_in(tp: object) -> typing.Iterator[type[msgspec.Struct]]:
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        yield tp
    for arg in typing.get_args(tp):
        yield from _structs_in(arg)


def _all_structs(root: type[msgspec.Struct]) -> set[type[msgspec.Struct]]:
    seen: set[type[msgspec.Struct]] = set()
    todo = [root]
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        for f in msgspec.structs.fields(cls):
            todo.extend(_structs_in(f.type))
    return seen


def test_every_field_of_every_model_is_listed() -> None:
    text = render_reference()
    sections = _sections(text)
    checked = 0
    for cf in config_files():
        for cls in _all_structs(cf.model):
            rows = sections[f"{cls.__module__}.{cls.__qualname__}"]
            expected = {f.encode_name for f in msgspec.structs.fields(cls)}
            tag_field = cls.__struct_config__.tag_field
            if tag_field is not None:
                expected.add(tag_field)
            assert set(rows) == expected, cls
            checked += len(expected)
    assert checked > 100


def test_descriptions_come_from_the_model_comments() -> None:
    text = render_reference()
    comment = "this agent's own key for this node: one key per agent per node"
    assert field_comment(WireGuardTarget, "private_key_file") == comment
    assert _row(text, WireGuardTarget, "private_key_file")[2] == comment
    assert _row(text, WireGuardTarget, "port")[2] == ""  # no comment: nothing invented
    # a trailing comment continued on the line below the last field
    assert _row(text, AgentIdentity, "max_start_lag")[2].endswith("rather than timed dishonestly")


def test_sample_model_comments_and_docstring() -> None:
    text = render_reference([SAMPLE])
    assert "A leaf section." in text
    assert _row(text, Leaf, "port")[2] == "where it listens"
    assert _row(text, Leaf, "names")[2] == "the first line above and the second line above"
    assert _row(text, Leaf, "labels")[2] == ""
    assert _row(text, Leaf, "last")[2] == (
        "trailing on the last field continues the trailing comment")
    assert _row(text, Sample, "limit")[2] == "the comment of limit"
    assert _row(text, Sample, "name")[2] == (
        "a block directly above `name` belongs to `name`, not to `limit`")


def test_sample_model_types_defaults_and_constraints() -> None:
    text = render_reference([SAMPLE])
    assert _row(text, Sample, "mode")[:2] == ['one of `"fast"` / `"slow"`', '`"fast"`']
    assert _row(text, Sample, "name")[1] == "**required**"
    assert _row(text, Sample, "limit")[:2] == ["integer or null", "`null`"]
    assert _row(text, Sample, "leaf")[:2] == [
        "section [`leaf`](#sample-leaf)", "the section's defaults"]
    assert _row(text, Sample, "leaves")[0] == (
        "map of string to section [`leaf`](#sample-leaf)")
    assert "Also at `leaves.<key>`, `plugins[].leaf`." in text
    assert _row(text, Sample, "plugins")[0] == (
        "list of one of [`kind: alpha`](#sample-plugins-alpha) / "
        "[`kind: beta`](#sample-plugins-beta) (chosen by `kind`)")
    assert _row(text, Alpha, "kind")[:2] == ['`"alpha"`', "**required**"]
    assert _row(text, Leaf, "port")[:2] == ["integer (>= 1, <= 65535)", "`443`"]
    assert _row(text, Leaf, "names")[:2] == ["list of string", "`[]`"]
    assert _row(text, Leaf, "labels")[:2] == ["map of string to number", "`{}`"]
    assert _row(text, Leaf, "silent")[:2] == ["boolean", "`false`"]
    # every link points at an anchor on the page
    anchors = set(re.findall(r'<a id="([^"]+)"></a>', text))
    assert set(re.findall(r"\]\(#([^)]+)\)", text)) <= anchors
    # Alpha and Beta do not forbid unknown keys: the page says so for them only
    assert text.count("Unknown keys in this section are ignored.") == 2


def test_real_reference_types() -> None:
    text = render_reference()
    assert _row(text, OpenVPNTarget, "proto")[:2] == ['one of `"tcp"` / `"udp"`', '`"udp"`']
    assert _row(text, L4Target, "tcp_ports")[0] == "list of integer"
    assert _row(text, AgentConfig, "tiers")[0].startswith("map of string to section [`tiers.")
    publishers = _row(text, MeshConfig, "publishers")[0]
    assert "[`type: webhook`]" in publishers and "[`type: haproxy`]" in publishers
    anchors = set(re.findall(r'<a id="([^"]+)"></a>', text))
    assert len(anchors) == text.count("<a id=")  # no anchor twice
    assert set(re.findall(r"\]\(#([^)]+)\)", text)) <= anchors
