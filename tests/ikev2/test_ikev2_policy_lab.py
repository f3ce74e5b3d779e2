"""The IKEv2 policy scan and the negotiated-parameter facts against a real strongSwan, configured
weak and configured strict."""

from __future__ import annotations

import asyncio
import os
import re
import time
from typing import Any

import pytest

from probes.checks.driver import Driver
from probes.checks.ikev2 import _Session, negotiated_facts
from probes.checks.ikev2_policy import Ikev2PolicyParams, run_policy
from probes.checks.udp import UdpEndpoint
from probes.model import Reason
from probes.protocols.ikev2.initiator import (
    AuthCompleted,
    ChildRequest,
    Initiator,
    InitiatorConfig,
)
from probes.protocols.ikev2.policy import DEFAULT_ITEMS
from probes.protocols.ikev2.proposals import esp_label, parse_ike_proposals
from tests.ikev2.test_ikev2_lab import in_agent, settled_sas

pytestmark = [pytest.mark.ikev2, pytest.mark.lab]

WEAK_IKE = ("aes256-sha1-modp1024", "3des-md5-prfmd5-modp1536", "aes256gcm16-prfsha256-ecp256")
WEAK_ESP = ("3des-sha1", "aes256gcm16")  # no DH group: new CHILD_SAs without PFS are fine
# what WEAK_IKE/WEAK_ESP accept of the scan's offers, and nothing else
WEAK_ACCEPTS = {"ike_encr_3des", "ike_integ_md5", "ike_integ_sha1", "ike_prf_md5",
                "ike_prf_sha1", "ike_dh_modp1024", "ike_dh_modp1536", "esp_encr_3des",
                "esp_integ_sha1", "esp_no_pfs"}
STRICT_IKE = ("aes256gcm16-prfsha256-ecp256", "aes256-sha256-modp2048")
# a DH group in the ESP proposal: PFS required for every CHILD_SA made by CREATE_CHILD_SA (the
# one made in IKE_AUTH has no key exchange of its own, and strongSwan ignores the group there)
STRICT_ESP = ("aes256gcm16-ecp256",)


def policy_params(node: Any, ike: Any, **kw: Any) -> Ikev2PolicyParams:
    base: dict[str, Any] = dict(host=node.address, psk_file=str(ike.psk_file),
                                local_id=ike.remote_id, remote_id=ike.local_id)
    base.update(kw)
    return Ikev2PolicyParams(**base)


def scan(agent: Any, p: Ikev2PolicyParams, timeout: float = 60.0) -> Any:
    return in_agent(agent, lambda: run_policy(p, timeout))


def test_weak_node_each_accepted_choice_named_and_nothing_left(lab: Any) -> None:
    node, agent = lab.add_host("node"), lab.add_host("agent")
    ike = lab.start_strongswan(node, proposals=WEAK_IKE, esp_proposals=WEAK_ESP)
    result = scan(agent, policy_params(node, ike))
    assert not result.ok and result.reason is Reason.WEAK_CRYPTO, result
    accepted = {n for n in DEFAULT_ITEMS if result.facts[f"policy.{n}"] == "accepted"}
    assert accepted == WEAK_ACCEPTS, result.facts
    assert {n for n in DEFAULT_ITEMS if result.facts[f"policy.{n}"] == "refused"} == \
        set(DEFAULT_ITEMS) - WEAK_ACCEPTS
    assert result.facts["node_policy_weak_accepted"] == len(WEAK_ACCEPTS)
    assert "3des" in str(result.facts["chosen.ike_encr_3des"])
    assert "3des-sha1" in str(result.facts["chosen.esp_encr_3des"])
    # strongSwan picks by its own order: its first ESP proposal, taken without a key exchange
    assert str(result.facts["chosen.esp_no_pfs"]).endswith(" / 3des-sha1"), result.facts
    assert "3DES encryption (IKE SA)" in result.detail
    # strongSwan 5.9 has no ML-KEM: the hybrid offer is refused (the negative path)
    assert result.facts["post_quantum"] == "refused", result.facts
    assert result.facts["node_pq_key_exchange_accepted"] == 0
    assert settled_sas(ike) == []


def test_strict_node_yields_nothing(lab: Any) -> None:
    node, agent = lab.add_host("node"), lab.add_host("agent")
    ike = lab.start_strongswan(node, proposals=STRICT_IKE, esp_proposals=STRICT_ESP)
    result = scan(agent, policy_params(node, ike))
    assert result.ok and result.reason is Reason.OK, result
    assert all(result.facts[f"policy.{n}"] == "refused" for n in DEFAULT_ITEMS), result.facts
    assert result.facts["node_policy_weak_accepted"] == 0
    # the no-PFS CHILD_SA was refused for its missing key exchange: AES-GCM-256 was offered
    assert re.search(r"parsed CREATE_CHILD_SA request \d+ \[ SA No TSi TSr \]", ike.log())
    assert re.search(r"received proposals: ESP:AES_GCM_16_128/AES_GCM_16_256/NO_EXT_SEQ",
                     ike.log())
    assert re.search(r"generating CREATE_CHILD_SA response \d+ \[ N\(NO_PROP\) \]", ike.log())
    assert settled_sas(ike) == []


# swanctl --list-sas spells algorithms its own way
_SWANCTL = {"aes256": "AES_CBC-256", "aes256gcm16": "AES_GCM_16-256", "3des": "3DES_CBC",
            "sha1": "HMAC_SHA1_96", "sha256": "HMAC_SHA2_256_128", "md5": "HMAC_MD5_96",
            "prfsha1": "PRF_HMAC_SHA1", "prfsha256": "PRF_HMAC_SHA2_256",
            "prfmd5": "PRF_HMAC_MD5", "modp1024": "MODP_1024", "modp1536": "MODP_1536",
            "modp2048": "MODP_2048", "ecp256": "ECP_256"}


async def _established(node: Any, ike: Any, proposal: str, esp: str) -> tuple[Any, str]:
    """An IKE SA and CHILD_SA held open while swanctl is asked, then deleted."""
    ep = await UdpEndpoint.open(node.address, 500)
    ini = Initiator(InitiatorConfig(
        local_address=ep.local_address, remote_address=ep.remote,
        proposals=parse_ike_proposals((proposal,)), psk=ike.psk.encode(),
        local_id=ike.remote_id, remote_id=ike.local_id,
        child=ChildRequest(esp_proposal=esp, aead_only=False, ts_i=("10.211.0.7/32",),
                           ts_r=(f"{ike.inner_address}/32",))))
    driver: Driver[Any] = Driver(ini)
    driver.adopt_udp(ep.remote, ep)
    session = _Session(ini, driver)
    ini.start(time.monotonic())
    await session.run_until(AuthCompleted, time.monotonic() + 30)
    try:
        listed = await asyncio.to_thread(ike.list_sas)
    finally:
        await session.close()
    return session.outcome, listed


@pytest.mark.parametrize(("proposal", "esp"), [
    ("aes256-sha1-modp1024", "3des-sha1"),
    ("3des-md5-prfmd5-modp1536", "3des-sha1"),
    ("aes256gcm16-prfsha256-ecp256", "aes256gcm16"),
])
def test_negotiated_facts_match_swanctl(lab: Any, proposal: str, esp: str) -> None:
    node, agent = lab.add_host("node"), lab.add_host("agent")
    ike = lab.start_strongswan(node, proposals=WEAK_IKE, esp_proposals=WEAK_ESP)
    outcome, listed = in_agent(agent, lambda: _established(node, ike, proposal, esp))
    assert outcome.auth is not None and outcome.auth.child is not None, (outcome, ike.log())
    facts = negotiated_facts(outcome.init.suite)
    # "lab: #1, ESTABLISHED, IKEv2, ...\n  ...\n  AES_CBC-256/HMAC_SHA1_96/PRF_HMAC_SHA1/MODP_1024"
    ike_line = next(line.strip() for line in listed.splitlines()
                    if re.match(r"^\s+[A-Z0-9_]+(-\d+)?/", line) and "PRF_" in line)
    expect = [_SWANCTL[facts["crypto.ike_encryption"]]]
    if facts["crypto.ike_integrity"] != "none":
        expect.append(_SWANCTL[facts["crypto.ike_integrity"]])
    expect += [_SWANCTL[facts["crypto.ike_prf"]], _SWANCTL[facts["crypto.ike_dh_group"]]]
    assert ike_line == "/".join(expect), listed
    # the CHILD_SA line: "lab: #1, reqid 1, INSTALLED, TUNNEL-in-UDP, ESP:3DES_CBC/HMAC_SHA1_96"
    child = re.search(r"ESP:(\S+)", listed)
    assert child is not None, listed
    label = esp_label(outcome.auth.child.proposal)
    assert child.group(1) == "/".join(_SWANCTL[t] for t in label.split("-")), listed
    assert settled_sas(ike) == []


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_fifty_scans_leave_nothing(lab: Any) -> None:
    """The acceptance run: 50 full scans of a weak node, then swanctl shows no SA at all."""
    node, agent = lab.add_host("node"), lab.add_host("agent")
    ike = lab.start_strongswan(node, proposals=WEAK_IKE, esp_proposals=WEAK_ESP)
    p = policy_params(node, ike)
    started = time.monotonic()
    for n in range(50):
        result = scan(agent, p)
        assert result.reason is Reason.WEAK_CRYPTO, (n, result)
        assert result.facts["node_policy_weak_accepted"] == len(WEAK_ACCEPTS), (n, result.facts)
    took = time.monotonic() - started
    assert settled_sas(ike) == [], ike.list_sas()
    print(f"\n50 scans in {took:.1f} s ({took / 50:.2f} s a scan); load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
