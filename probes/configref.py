"""The configuration reference (docs/configuration-reference.md), generated from the config models.

The models are the single source of truth: a section's text is its class docstring, a field's
description is the comment on its definition line (and the comment lines directly above it, or
directly below a commented field when no statement follows them), its type, default and
constraints come from ``msgspec.inspect``. Nothing is invented: a field without a comment gets
an empty description. ``tunnelwatch config-reference`` writes the file; ``--check`` (and the unit
tests) fail when the committed copy no longer matches the models.
"""

from __future__ import annotations

import ast
import enum
import functools
import inspect
import io
import json
import re
import textwrap
import tokenize
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec
import msgspec.inspect as mi

from probes.duration import DURATION_EXTRA

if TYPE_CHECKING:
    from probes.checks.base import Family

GENERATOR_COMMAND = "tunnelwatch config-reference"


@dataclass(frozen=True, slots=True)
class ConfigFile:
    """One config file the CLI reads, and the model it is converted into."""

    key: str  # anchor prefix, e.g. "agent"
    title: str
    model: type[msgspec.Struct]
    usage: str  # which commands read it (Markdown)


def config_files() -> tuple[ConfigFile, ...]:
    """Every config file ``tunnelwatch`` reads, in the order the reference lists them."""
    # imported here: the mesh and receiver models pull in their whole subsystems
    from probes.config import AgentConfig  # noqa: PLC0415
    from probes.mesh.config import MeshConfig  # noqa: PLC0415
    from probes.mesh.publish.receiver import ReceiverConfig  # noqa: PLC0415

    return (
        ConfigFile("agent", "Agent configuration", AgentConfig,
                   "`tunnelwatch agent --config FILE`; checked by `tunnelwatch check-config FILE`"),
        ConfigFile("mesh", "Mesh configuration", MeshConfig,
                   "`tunnelwatch mesh --config FILE`; checked by "
                   "`tunnelwatch check-config --kind mesh FILE`"),
        ConfigFile("receiver", "Webhook receiver configuration", ReceiverConfig,
                   "`tunnelwatch receiver --config FILE`; checked by "
                   "`tunnelwatch receiver --config FILE --check`"),
    )


# ---------------------------------------------------------------------------------------------
# descriptions from the source: docstrings and comments


def section_text(cls: type) -> str:
    """The class's own docstring (not an inherited one), dedented; empty when it has none."""
    doc = vars(cls).get("__doc__")
    return inspect.cleandoc(doc) if isinstance(doc, str) else ""


def _defining_class(cls: type, name: str) -> type:
    for klass in cls.__mro__:
        if name in vars(klass).get("__annotations__", {}):
            return klass
    return cls


def field_comment(cls: type, name: str) -> str:
    """The comment text written for field ``name`` where it is defined; empty when there is none."""
    return _class_comments(_defining_class(cls, name)).get(name, "")


@functools.cache
def _class_comments(cls: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments: dict[int, str] = {}
    code_lines: set[int] = set()
    layout = {tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in layout:
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    node = ast.parse(source).body[0]
    if not isinstance(node, ast.ClassDef):
        return {}

    def comment_only(line: int) -> bool:
        return line in comments and line not in code_lines

    found: dict[str, str] = {}
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        start, end = stmt.lineno, stmt.end_lineno or stmt.lineno
        above: list[str] = []
        line = start - 1
        while comment_only(line):
            above.insert(0, comments[line])
            line -= 1
        trailing = [comments[n] for n in range(start, end + 1) if n in comments]
        below: list[str] = []
        line = end + 1
        while trailing and comment_only(line):
            below.append(comments[line])
            line += 1
        # a comment block directly above the next statement describes that statement instead
        if line in code_lines:
            below = []
        found[stmt.target.id] = " ".join(part for part in above + trailing + below if part)
    return found


# ---------------------------------------------------------------------------------------------
# walking the models


@dataclass(slots=True)
class Section:
    """One struct of one config file: where it sits in the YAML and its anchor in the page."""

    info: mi.StructType
    anchor: str
    paths: list[str] = field(default_factory=list)
    tagged: bool = False  # reached as an alternative of a tagged union: the tag is required


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _unwrap(t: mi.Type) -> mi.Type:
    while isinstance(t, mi.Metadata):
        t = t.type
    return t


class _Walker:
    def __init__(self, key: str) -> None:
        self.key = key
        self.sections: dict[type, Section] = {}
        self.anchors: set[str] = set()

    def struct(self, info: mi.StructType, path: str, *, tagged: bool = False) -> None:
        section = self.sections.get(info.cls)
        if section is not None:
            if path not in section.paths:
                section.paths.append(path)
            return
        label = path + (f"-{info.tag}" if tagged and info.tag is not None else "")
        anchor = f"{self.key}-{_slug(label) or 'top'}"
        while anchor in self.anchors:
            anchor += "-1"
        self.anchors.add(anchor)
        self.sections[info.cls] = Section(info, anchor, [path], tagged)
        for f in info.fields:
            self.visit(f.type, f"{path}.{f.encode_name}" if path else f.encode_name)

    def visit(self, t: mi.Type, path: str, *, tagged: bool = False) -> None:
        t = _unwrap(t)
        if isinstance(t, mi.StructType):
            self.struct(t, path, tagged=tagged)
        elif isinstance(t, mi.UnionType):
            alternatives = [s for s in t.types if isinstance(_unwrap(s), mi.StructType)]
            for member in t.types:
                self.visit(member, path, tagged=len(alternatives) > 1)
        elif isinstance(t, (mi.ListType, mi.SetType, mi.FrozenSetType, mi.VarTupleType)):
            self.visit(t.item_type, f"{path}[]")
        elif isinstance(t, mi.TupleType):
            for item in t.item_types:
                self.visit(item, f"{path}[]")
        elif isinstance(t, mi.DictType):
            self.visit(t.value_type, f"{path}.<key>")


# ---------------------------------------------------------------------------------------------
# rendering


def _constraints(t: mi.Type) -> list[str]:
    found: list[str] = []
    if isinstance(t, (mi.IntType, mi.FloatType)):
        for name, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            value = getattr(t, name)
            if value is not None:
                found.append(f"{op} {value}")
        if t.multiple_of is not None:
            found.append(f"multiple of {t.multiple_of}")
    if isinstance(t, (mi.StrType, mi.ListType, mi.SetType, mi.FrozenSetType, mi.VarTupleType,
                      mi.DictType)):
        unit = "characters" if isinstance(t, mi.StrType) else "items"
        if t.min_length is not None:
            found.append(f"at least {t.min_length} {unit}")
        if t.max_length is not None:
            found.append(f"at most {t.max_length} {unit}")
    if isinstance(t, mi.StrType) and t.pattern is not None:
        found.append(f"matches `{t.pattern}`")
    return found


def _literal(value: object) -> str:
    return f"`{json.dumps(value.value if isinstance(value, enum.Enum) else value)}`"


_SCALARS: dict[type, str] = {
    mi.StrType: "string", mi.IntType: "integer", mi.FloatType: "number",
    mi.BoolType: "boolean", mi.NoneType: "null", mi.AnyType: "any value",
    mi.BytesType: "string (base64)", mi.ByteArrayType: "string (base64)",
    mi.DateTimeType: "string (RFC 3339 date-time)", mi.DateType: "string (date)",
    mi.TimeType: "string (time)", mi.TimeDeltaType: "number (seconds) or duration string",
    mi.UUIDType: "string (UUID)", mi.DecimalType: "number",
}


class _Renderer:
    def __init__(self, sections: dict[type, Section]) -> None:
        self.sections = sections

    def link(self, cls: type, text: str) -> str:
        return f"[{text}](#{self.sections[cls].anchor})"

    def describe(self, t: mi.Type) -> str:
        if isinstance(t, mi.Metadata) and t.extra == DURATION_EXTRA:
            return "duration (seconds, or a string such as `500ms`, `2s`, `1m30s`)"
        t = _unwrap(t)
        text = self._type(t)
        limits = _constraints(t)
        return f"{text} ({', '.join(limits)})" if limits else text

    def _type(self, t: mi.Type) -> str:
        if isinstance(t, mi.StructType):
            return "section " + self.link(t.cls, f"`{self.sections[t.cls].paths[0] or 'top'}`")
        if isinstance(t, mi.LiteralType):
            return "one of " + " / ".join(_literal(v) for v in t.values)
        if isinstance(t, mi.EnumType):
            return "one of " + " / ".join(_literal(v) for v in t.cls)
        if isinstance(t, (mi.ListType, mi.SetType, mi.FrozenSetType, mi.VarTupleType)):
            return f"list of {self.describe(t.item_type)}"
        if isinstance(t, mi.TupleType):
            return "list of [" + ", ".join(self.describe(i) for i in t.item_types) + "]"
        if isinstance(t, mi.DictType):
            return f"map of {self.describe(t.key_type)} to {self.describe(t.value_type)}"
        if isinstance(t, mi.UnionType):
            return self._union(t)
        return _SCALARS.get(type(t), type(t).__name__)

    def _union(self, t: mi.UnionType) -> str:
        members = [_unwrap(m) for m in t.types]
        nullable = any(isinstance(m, mi.NoneType) for m in members)
        rest = [m for m in members if not isinstance(m, mi.NoneType)]
        tagged = [m for m in rest if isinstance(m, mi.StructType) and m.tag is not None]
        if len(tagged) > 1 and len(tagged) == len(rest):
            field_name = tagged[0].tag_field
            options = " / ".join(self.link(m.cls, f"`{m.tag_field}: {m.tag}`") for m in tagged)
            text = f"one of {options} (chosen by `{field_name}`)"
        else:
            text = " or ".join(self.describe(m) for m in rest)
        return f"{text} or null" if nullable else text

    def default(self, f: mi.Field) -> str:
        if f.required:
            return "**required**"
        if f.default is not msgspec.NODEFAULT:
            value: Any = f.default
        else:
            factory: Callable[[], Any] = f.default_factory
            value = factory()
        if isinstance(value, msgspec.Struct) and _is_all_defaults(value):
            return "the section's defaults"
        return _value(value)

    def section(self, section: Section) -> Iterator[str]:
        info = section.info
        first, *others = section.paths
        heading = f"`{first}`" if first else "top level"
        if section.tagged and info.tag is not None:
            heading += f" with `{info.tag_field}: {info.tag}`"
        yield f'<a id="{section.anchor}"></a>'
        yield ""
        yield f"### {heading}"
        yield ""
        yield f"Model: `{info.cls.__module__}.{info.cls.__qualname__}`."
        if others:
            yield "Also at " + ", ".join(f"`{p}`" for p in others) + "."
        if not info.forbid_unknown_fields:
            yield "Unknown keys in this section are ignored."
        text = section_text(info.cls)
        if text:
            yield ""
            yield text
        yield ""
        yield "| field | type | required / default | description |"
        yield "|---|---|---|---|"
        if info.tag_field is not None and info.tag is not None:
            need = "**required**" if section.tagged else f"`{json.dumps(info.tag)}`"
            yield f"| `{info.tag_field}` | {_literal(info.tag)} | {need} |  |"
        for f in info.fields:
            description = field_comment(info.cls, f.name) or _meta_description(f.type)
            cells = (f"`{f.encode_name}`", self.describe(f.type), self.default(f), description)
            yield "| " + " | ".join(_cell(c) for c in cells) + " |"
        yield ""


def _meta_description(t: mi.Type) -> str:
    while isinstance(t, mi.Metadata):
        schema = t.extra_json_schema or {}
        if isinstance(schema.get("description"), str):
            return str(schema["description"])
        t = t.type
    return ""


def _is_all_defaults(value: msgspec.Struct) -> bool:
    try:
        return bool(value == type(value)())
    except TypeError:  # it has required fields
        return False


def _value(value: object) -> str:
    return f"`{json.dumps(msgspec.to_builtins(value))}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_file(cf: ConfigFile) -> str:
    """The reference for one config file: a level-2 heading, then one section per struct."""
    walker = _Walker(cf.key)
    root = mi.type_info(cf.model)
    if not isinstance(root, mi.StructType):
        raise TypeError(f"{cf.model!r} is not a msgspec Struct")
    walker.struct(root, "")
    renderer = _Renderer(walker.sections)
    lines = [f'<a id="{cf.key}"></a>', "", f"## {cf.title}", "", f"Read by {cf.usage}.", ""]
    for section in walker.sections.values():
        lines.extend(renderer.section(section))
    return "\n".join(lines)


HEADER = f"""\
<!-- Generated by `{GENERATOR_COMMAND}` (or `make docs`) from the config models: do not edit. -->

# Configuration reference

Every key of every config file `tunnelwatch` reads, generated by `{GENERATOR_COMMAND}` (or
`make docs`) from the msgspec models in `probes/config.py`, `probes/mesh/config.py` and the
modules they use. Section text is the model's docstring; a field's description is the comment
on its definition in the source (empty where the source has none). To change this page, change
the model and regenerate; `{GENERATOR_COMMAND} --check` fails while it is stale.

Types are YAML types. `null` means the key may be left out or set to null. Unknown keys are
errors unless a section says otherwise. Rules that span fields (a port in 1..65535, an interval
longer than its timeout, files that must exist, ...) are checked after the types and are
described in [configuration.md](configuration.md); `tunnelwatch check-config FILE` reports
them all.
"""


def render_kinds(families: Sequence[Family]) -> str:
    """The check kinds of the registry: section, tier and what each one checks."""
    lines = ['<a id="check-kinds"></a>', "", "## Check kinds", "",
             "Every check kind the agent can plan, from the registry "
             "(`probes/checks/registry.py`). A target's config section plans its kinds; each "
             "observation carries its kind's tier to the mesh; `checks:` on a target filters by "
             "check name, kind or section.", "",
             "| config section | kind | tier | what it checks |", "|---|---|---|---|"]
    for family in families:
        lines += [f"| {family.name} | `{kind.name}` | {kind.tier.value} | "
                  f"{_cell(kind.description)} |" for kind in family.kinds]
    return "\n".join(lines) + "\n"


def render_reference(files: Sequence[ConfigFile] | None = None,
                     families: Sequence[Family] | None = None) -> str:
    """The whole page: header, a contents list, every config file's sections, then the check
    kinds of the registry."""
    if families is None:
        from probes.checks import registry  # noqa: PLC0415 - imports every check

        families = registry.families()
    chosen = config_files() if files is None else tuple(files)
    contents = [f"- [{cf.title}](#{cf.key})" for cf in chosen] + ["- [Check kinds](#check-kinds)"]
    parts = [HEADER, "\n".join(contents) + "\n", *(render_file(cf) for cf in chosen),
             render_kinds(families)]
    return "\n".join(parts).rstrip("\n") + "\n"
