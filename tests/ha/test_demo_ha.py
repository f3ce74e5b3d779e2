"""`tunnelwatch demo --ha` runs its script and finds every verdict delivered."""

from __future__ import annotations

import io

import pytest

from probes.lab.ha_story import run
from tests.conftest import lab_unavailable

pytestmark = [pytest.mark.ha, pytest.mark.lab]


def test_ha_demo_story() -> None:
    if reason := lab_unavailable():
        pytest.skip(reason)
    out = io.StringIO()
    assert run(out), out.getvalue()
    text = out.getvalue()
    assert "leads after" in text and "nothing lost" in text
