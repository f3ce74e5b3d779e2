"""The signing helper shared by agent and mesh."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import pytest

from probes.model import signing

pytestmark = pytest.mark.mesh
KEY = b"0123456789abcdef0123456789abcdef"


def test_sign_is_hmac_sha256_over_timestamp_dot_body() -> None:
    body = b'{"a":1}'
    expected = hmac.new(KEY, b"1764134400.000." + body, hashlib.sha256).hexdigest()
    assert signing.sign(KEY, "1764134400.000", body) == expected
    assert signing.verify(KEY, "1764134400.000", body, expected)
    assert signing.verify(KEY, "1764134400.000", body, expected.upper())


@pytest.mark.parametrize(
    ("timestamp", "body", "key"),
    [
        ("1764134400.001", b'{"a":1}', KEY),
        ("1764134400.000", b'{"a":2}', KEY),
        ("1764134400.000", b'{"a":1}', KEY[::-1]),
    ],
)
def test_verify_rejects_any_change(timestamp: str, body: bytes, key: bytes) -> None:
    good = signing.sign(KEY, "1764134400.000", b'{"a":1}')
    assert not signing.verify(key, timestamp, body, good)


def test_headers_and_timestamp_window() -> None:
    headers = signing.signed_headers("va", "va-1", KEY, b"{}", 1000.5)
    assert headers[signing.HEADER_TIMESTAMP] == "1000.500"
    assert signing.verify(KEY, "1000.500", b"{}", headers[signing.HEADER_SIGNATURE])
    assert signing.timestamp_fresh("1000.500", 1200.0, 300)
    assert not signing.timestamp_fresh("1000.500", 1400.0, 300)
    for bad in ("", "1e9", "-5", "1.2.3", "nan", "12 ", "\u0661\u0662"):
        assert signing.parse_timestamp(bad) is None
    assert not signing.verify(KEY, "\u0661", b"", "00")
    assert not signing.verify(KEY, "1000.500", b"{}", "\u00e9" * 64)


def test_key_files(tmp_path: Path) -> None:
    good = signing.write_key_file(tmp_path / "k", signing.generate_key() + "\n")
    assert len(signing.load_key(good)) == 64
    short = signing.write_key_file(tmp_path / "s", "short")
    with pytest.raises(signing.KeyFileError, match="at least 32"):
        signing.load_key(short)
    with pytest.raises(signing.KeyFileError, match="cannot read"):
        signing.load_key(tmp_path / "missing")
