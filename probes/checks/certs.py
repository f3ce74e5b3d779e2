"""The certificates a node presents: their dates as facts, and (where no TLS library judges
them, as in IKEv2) whether they chain to the operator's CA.

Facts (both protocols): ``chain.<i>.subject``, ``.not_before``, ``.not_after`` (ISO 8601) of
every certificate as presented (leaf first), ``cert_chain_length``, and the gauges the
certificate alerts read: the leaf's start and end and the whole chain's earliest end.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from probes.checks.base import ConfigError, Fact
from probes.model import Reason

MAX_CHAIN = 8  # what a node may present that we look at


def _parsed(cert: x509.Certificate) -> x509.Certificate:
    """``cert`` with every field we read parsed now (``cryptography`` parses names, dates and
    extensions lazily): ValueError here, not later."""
    _ = (cert.subject.rfc4514_string(), cert.issuer.rfc4514_string(), cert.not_valid_before_utc,
         cert.not_valid_after_utc, list(cert.extensions))
    return cert


def load_certificate(der: bytes) -> x509.Certificate:
    try:
        return _parsed(x509.load_der_x509_certificate(der))
    except x509.InvalidVersion as exc:  # not a ValueError
        raise ValueError(str(exc)) from None


def chain_facts(chain: tuple[bytes, ...]) -> dict[str, Fact]:
    """Every certificate the node presented (leaf first), parsed or named "unparsable"."""
    out: dict[str, Fact] = {"cert_chain_length": len(chain)}
    not_after: list[float] = []
    for i, der in enumerate(chain[:MAX_CHAIN]):
        try:
            cert = load_certificate(der)
        except ValueError:
            out[f"chain.{i}.subject"] = "unparsable"
            continue
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
        out[f"chain.{i}.subject"] = cert.subject.rfc4514_string()
        out[f"chain.{i}.not_before"] = start.isoformat()
        out[f"chain.{i}.not_after"] = end.isoformat()
        not_after.append(end.timestamp())
        if i == 0:
            out["node_certificate_not_before_timestamp_seconds"] = start.timestamp()
            out["node_certificate_expiry_timestamp_seconds"] = end.timestamp()
    if not_after:
        out["node_certificate_chain_expiry_timestamp_seconds"] = min(not_after)
    return out


def read_ca_file(path: str) -> tuple[x509.Certificate, ...]:
    """The CA certificates of a PEM file (one or several)."""
    try:
        certs = [_parsed(c) for c in x509.load_pem_x509_certificates(Path(path).read_bytes())]
    except OSError as exc:
        raise ConfigError(f"cannot read CA file {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"CA file {path}: {exc}") from None
    return tuple(certs)


def _valid_at(cert: x509.Certificate, now: dt.datetime, what: str
              ) -> tuple[Reason, str] | None:
    if now > cert.not_valid_after_utc:
        return Reason.CERT_EXPIRED, (f"{what} {cert.subject.rfc4514_string()} expired "
                                     f"{cert.not_valid_after_utc.isoformat()}")
    if now < cert.not_valid_before_utc:
        return Reason.CERT_VERIFY_FAILED, (f"{what} {cert.subject.rfc4514_string()} is not yet "
                                           f"valid (from {cert.not_valid_before_utc.isoformat()})")
    return None


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def verify_chain(chain: tuple[bytes, ...], trusted: tuple[x509.Certificate, ...],
                 now: dt.datetime) -> tuple[Reason, str] | None:
    """Why the presented chain (leaf first, then intermediates in any order) does not lead to
    one of ``trusted`` at ``now``; None when it does. Each link: issuer name and signature, the
    dates of every certificate on the path, and CA basic constraints of every issuer."""
    try:
        presented = [load_certificate(der) for der in chain[:MAX_CHAIN]]
    except ValueError as exc:
        return Reason.CERT_VERIFY_FAILED, f"a presented certificate does not parse: {exc}"
    if not presented:
        return Reason.CERT_VERIFY_FAILED, "no certificate presented"
    current, what = presented[0], "certificate"
    for _ in range(MAX_CHAIN + 1):
        bad = _valid_at(current, now, what)
        if bad is not None:
            return bad
        anchor = next((ca for ca in trusted if _issued_by(current, ca)), None)
        if anchor is not None:
            return _valid_at(anchor, now, "CA")
        issuer = next((c for c in presented[1:] if c is not current and _issued_by(current, c)
                       and _is_ca(c)), None)
        if issuer is None:
            return Reason.CERT_VERIFY_FAILED, (
                f"{what} {current.subject.rfc4514_string()} is not issued by a trusted CA "
                f"(issuer {current.issuer.rfc4514_string()})")
        current, what = issuer, "intermediate"
    return Reason.CERT_VERIFY_FAILED, "certificate chain too long"


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False
