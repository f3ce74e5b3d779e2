"""Every alert's runbook_url resolves to a file and heading under docs/runbooks/."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.observability.tools import DOCS, ROOT, RULES

pytestmark = pytest.mark.observability

RUNBOOKS = DOCS / "runbooks"
# rules/generate.py RUNBOOK_BASE: the repository's docs as served by the forge
BASE = "https://github.com/tunnelwatch/tunnelwatch/blob/main/"


def slug(heading: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {
        slug(m.group(1))
        for m in re.finditer(r"^#{1,6}\s+(.+?)\s*$", path.read_text(), re.MULTILINE)
    }


def _alerts() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for path in RULES.glob("*.rules.yaml"):
        for group in yaml.safe_load(path.read_text())["groups"]:
            out.extend(r for r in group["rules"] if "alert" in r)
    return out


def test_slug_matches_github() -> None:
    assert slug("PoPDown") == "popdown"
    assert slug("Draining a node") == "draining-a-node"
    assert slug("Key rotation (HMAC, WireGuard)") == "key-rotation-hmac-wireguard"


def test_every_runbook_url_resolves() -> None:
    alerts = _alerts()
    assert alerts
    for rule in alerts:
        url = rule["annotations"]["runbook_url"]
        assert url.startswith(BASE + "docs/runbooks/"), url
        rel, _, anchor = url[len(BASE) :].partition("#")
        path = ROOT / rel
        assert path.is_file(), f"{rule['alert']}: {rel} missing"
        assert anchor == rule["alert"].lower(), url
        assert anchor in anchors(path), f"{rule['alert']}: no heading #{anchor} in {rel}"


def test_every_runbook_section_is_an_alert() -> None:
    """No stale runbook sections for alerts that no longer exist."""
    names = {r["alert"].lower() for r in _alerts()}
    for path in RUNBOOKS.glob("*.md"):
        if path.name == "README.md":
            continue
        sections = {
            slug(m.group(1)) for m in re.finditer(r"^##\s+(.+?)\s*$", path.read_text(), re.M)
        }
        assert sections <= names, f"{path.name}: {sorted(sections - names)}"


LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize(
    "doc",
    sorted(
        [*RUNBOOKS.glob("*.md")]
        + [DOCS / n for n in ("architecture.md", "operations.md", "observability.md")]
        + [DOCS / "metrics-mesh-publish.md"]
    ),
    ids=lambda p: p.name,
)
def test_relative_links_resolve(doc: Path) -> None:
    if not doc.exists():
        pytest.fail(f"{doc.relative_to(ROOT)} is missing")
    for target in LINK.findall(doc.read_text()):
        if "://" in target or target.startswith("mailto:"):
            continue
        rel, _, anchor = target.partition("#")
        path = (doc.parent / rel).resolve() if rel else doc
        assert path.exists(), f"{doc.name}: broken link {target}"
        if anchor and path.suffix == ".md":
            assert anchor in anchors(path), f"{doc.name}: no #{anchor} in {rel or doc.name}"
