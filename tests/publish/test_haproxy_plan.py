"""Pure parts of the HAProxy publisher: parsing `show servers state`, planning commands."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from probes.mesh.publish.haproxy import Desired, ServerMap, StateMapping, plan
from probes.mesh.publish.runtime_api import RuntimeAPI, ServerState, parse_servers_state
from probes.model import VerdictState

pytestmark = pytest.mark.publish

COLUMNS = ("be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight "
           "srv_iweight srv_time_since_last_change srv_check_status srv_check_result "
           "srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id "
           "srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port srv_check_addr "
           "srv_agent_addr srv_agent_port")
SAMPLE = f"""1
# {COLUMNS}
3 vpn 1 node1 10.99.0.1 2 0 10 10 4 1 0 0 0 0 0 0 - 51820 - 0 0 - - 0
3 vpn 2 node2 10.99.0.2 0 1 10 10 4 1 0 0 0 0 0 0 - 51820 - 0 0 - - 0
3 vpn 3 node3 10.99.0.3 2 8 5 10 4 1 0 0 0 0 0 0 - 51820 - 0 0 - - 0
"""


def test_parse_servers_state() -> None:
    rows = parse_servers_state(SAMPLE)
    assert [r.admin for r in rows.values()] == ["ready", "maint", "drain"]
    assert rows[("vpn", "node3")].user_weight == 5
    assert rows[("vpn", "node1")].in_rotation
    assert not rows[("vpn", "node2")].in_rotation and not rows[("vpn", "node3")].in_rotation


@given(st.text(max_size=400))
def test_parse_never_crashes_on_garbage(text: str) -> None:
    rows = parse_servers_state(text)
    assert isinstance(rows, dict)


def row(admin: int, uweight: int = 10) -> ServerState:
    return ServerState("vpn", "n", 2, admin, uweight, 10)


@pytest.mark.parametrize(("current", "want", "commands"), [
    (row(0), Desired("ready", 100), []),
    (row(0), Desired("maint", 100), ["set server vpn/n state maint"]),
    (row(1), Desired("drain", 100), ["set server vpn/n state drain"]),
    (row(8, 5), Desired("ready", 100), ["set weight vpn/n 100%", "set server vpn/n state ready"]),
    (row(0), Desired("ready", 50), ["set weight vpn/n 50%"]),
    (row(1 | 8), Desired("maint", 100), []),  # maint wins over drain: already effective
])
def test_plan(current: ServerState, want: Desired, commands: list[str]) -> None:
    assert plan("vpn/n", current, want) == commands


def test_state_mapping_and_server_map() -> None:
    m = StateMapping(down_action="drain", degraded_weight_percent=25)
    assert m.desired(VerdictState.DOWN) == Desired("drain", 100)
    assert m.desired(VerdictState.DEGRADED) == Desired("ready", 25)
    assert m.desired(VerdictState.UNKNOWN) is None
    servers = ServerMap("be", {"a": ("x", "y")}, only_listed=False)
    assert servers.lookup("a") == ("x", "y") and servers.lookup("b") == ("be", "b")
    assert ServerMap("be", {}, only_listed=True).lookup("b") is None
    assert ServerMap.parse_ref("x/y", "be") == ("x", "y")
    assert ServerMap.parse_ref("y", "be") == ("be", "y")


def test_runtime_api_needs_exactly_one_transport() -> None:
    with pytest.raises(ValueError):
        RuntimeAPI()
    with pytest.raises(ValueError):
        RuntimeAPI(socket_path="/x", address=("127.0.0.1", 1))
