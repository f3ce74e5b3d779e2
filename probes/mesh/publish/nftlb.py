"""nftlb publisher: verdicts and weights become backend states and weights of nftlb farms.

nftlb (Debian ``nftlb``) is an nftables L4 balancer with a JSON REST API: farms (virtual
services, UDP included) hold backends with a ``weight`` (an integer >= 1; the ``weight``
scheduler draws new flows ``numgen random mod <sum of weights>``) and a ``state``. What its
states mean (read in its ``backends.c``, checked against the real daemon in
tests/publish/test_nftlb_lab.py):

=================  ===============================================================
nftlb state        new flows / flows already in conntrack
=================  ===============================================================
``up``             chosen by weight / kept
``off``            not chosen / kept (the backend stays in the NAT map: a drain)
``down``           not chosen / whatever the health of the node allows
=================  ===============================================================

=============  =======================================================================
verdict        nftlb backend
=============  =======================================================================
UP             ``up``, weight = nominal x the node's weight (weights on) or 100 %
DEGRADED       ``up``, weight = nominal x ``degraded_weight_percent`` (weights off)
DOWN           ``down`` (``down_state: off`` keeps its flows instead)
DRAINING       ``off``: no new flows, existing ones continue
MAINTENANCE    ``off``
UNKNOWN        left as it is
=============  =======================================================================

A weight of 0 on a serving node (a DEGRADED cap of 0) is ``off`` as well: nftlb refuses
weight 0. Like the HAProxy publisher, every delivery converges: read the farm, send only what
differs, so a delivery twice is a delivery once and :meth:`NftlbPublisher.reconcile` is the
same code over every mapped backend. A backend nftlb does not have is never created (nftlb would
create an empty one from a POST naming it): that is a permanent error.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from probes.mesh.publish.base import PermanentError, Publisher, RetryableError
from probes.model import Verdict, VerdictState, WeightChange

log = logging.getLogger(__name__)

SERVING = frozenset({VerdictState.UP, VerdictState.DEGRADED})
MAX_WEIGHT = 10_000


@dataclass(frozen=True, slots=True)
class Backend:
    """One backend as nftlb reports it, or as wanted (state None: leave the state alone)."""

    state: str | None
    weight: int


class NftlbAPI:
    """The REST API of one nftlb: ``Key`` header auth, JSON bodies."""

    def __init__(self, url: str, key: str, timeout: float = 3.0) -> None:
        self.url = url.rstrip("/")
        self.key = key
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def _request(self, method: str, path: str, body: Any = None) -> Any:
        if self._session is None:
            # nftlb's server closes every connection after its answer: never reuse one
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                connector=aiohttp.TCPConnector(force_close=True))
        try:
            async with self._session.request(method, self.url + path, json=body,
                                             headers={"Key": self.key}) as resp:
                status = resp.status
                text = await resp.text()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise RetryableError(f"nftlb {self.url}: {type(exc).__name__}: {exc}") from None
        if status == 401:  # a key being rotated on the balancer: worth retrying
            raise RetryableError(f"nftlb {self.url}{path}: 401 (key)")
        try:
            answer = json.loads(text) if text else {}
        except ValueError:
            raise RetryableError(f"nftlb {self.url}{path}: HTTP {status}, not JSON") from None
        if status >= 400 or not isinstance(answer, dict):
            # nftlb answers an unknown farm or a body it refuses with 4xx/5xx and a "response"
            message = answer.get("response", "") if isinstance(answer, dict) else ""
            raise PermanentError(f"nftlb {method} {path}: HTTP {status} {message}".rstrip())
        return answer

    async def farm_backends(self, farm: str) -> dict[str, Backend]:
        answer = await self._request("GET", f"/farms/{farm}")
        try:
            (found,) = [f for f in answer["farms"] if f.get("name") == farm]
            return {b["name"]: Backend(str(b["state"]), int(b["weight"]))
                    for b in found["backends"]}
        except (KeyError, ValueError, TypeError) as exc:
            raise PermanentError(f"nftlb farm {farm}: unexpected answer ({exc})") from None

    async def set_backends(self, farm: str, changes: Mapping[str, dict[str, str]]) -> None:
        body = {"farms": [{"name": farm, "backends": [
            {"name": name, **values} for name, values in changes.items()]}]}
        answer = await self._request("POST", "/farms", body)
        if answer.get("response") != "success":
            raise PermanentError(f"nftlb farm {farm}: {answer.get('response')!r}")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


@dataclass(frozen=True, slots=True)
class BackendMap:
    """Node id -> its (farm, backend) pairs. Unlisted nodes are backend ``<node id>`` in every
    farm of ``farms`` that has one (a WireGuard farm and an IKE farm, say)."""

    farms: tuple[str, ...]
    backends: Mapping[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    only_listed: bool = False

    def lookup(self, node: str) -> tuple[tuple[str, str], ...]:
        if node in self.backends:
            return self.backends[node]
        return () if self.only_listed else tuple((farm, node) for farm in self.farms)


class NftlbPublisher(Publisher):
    supports_weights = True

    def __init__(self, name: str, api: NftlbAPI, backends: BackendMap, *,
                 nominal_weights: Mapping[str, int] | None = None,
                 degraded_weight_percent: int = 50, down_state: str = "down") -> None:
        self.name = name
        self.api = api
        self.backends = backends
        self.nominal = dict(nominal_weights or {})
        self.degraded_weight_percent = degraded_weight_percent
        self.down_state = down_state

    def _percent(self, node: str, state: VerdictState) -> int:
        weight = self.weight_of(node) if self.weight_of is not None else None
        if weight is not None:
            return weight
        return self.degraded_weight_percent if state == VerdictState.DEGRADED else 100

    def _weight(self, node: str, percent: int) -> int:
        return max(1, min(MAX_WEIGHT, (self.nominal.get(node, 100) * percent + 50) // 100))

    def desired(self, node: str, state: VerdictState) -> Backend | None:
        """The backend a verdict state asks for (None: UNKNOWN, leave it)."""
        if state in SERVING:
            percent = self._percent(node, state)
            return Backend("up" if percent > 0 else "off", self._weight(node, percent))
        if state == VerdictState.DOWN:
            return Backend(self.down_state, 0)
        if state in (VerdictState.DRAINING, VerdictState.MAINTENANCE):
            return Backend("off", 0)
        return None

    @staticmethod
    def _diff(have: Backend, want: Backend) -> dict[str, str]:
        """The fields to send; a weight is only sent with a node that takes new flows."""
        out: dict[str, str] = {}
        if want.state is not None and have.state != want.state:
            out["state"] = want.state
        if want.weight and have.weight != want.weight:
            out["weight"] = str(want.weight)
        return out

    async def _converge(self, wanted: Mapping[str, Backend], *, strict: bool) -> int:
        """Bring (farm/backend) -> wanted in line; returns how many backends changed."""
        by_farm: dict[str, dict[str, Backend]] = {}
        for ref, want in wanted.items():
            farm, backend = ref.split("/", 1)
            by_farm.setdefault(farm, {})[backend] = want
        fixed = 0
        for farm, wants in by_farm.items():
            have = await self.api.farm_backends(farm)
            changes: dict[str, dict[str, str]] = {}
            for backend, want in wants.items():
                current = have.get(backend)
                if current is None:
                    if strict:
                        raise PermanentError(f"nftlb farm {farm} has no backend {backend}")
                    log.warning("nftlb %s: farm %s has no backend %s", self.name, farm, backend)
                    continue
                diff = self._diff(current, want)
                if diff:
                    changes[backend] = diff
            if changes:
                await self.api.set_backends(farm, changes)
                log.info("nftlb %s: farm %s <- %s", self.name, farm, changes)
                fixed += len(changes)
        return fixed

    def _wanted(self, node: str, state: VerdictState) -> dict[str, Backend]:
        want = self.desired(node, state)
        if want is None:
            return {}
        return {f"{farm}/{backend}": want for farm, backend in self.backends.lookup(node)}

    async def deliver(self, verdict: Verdict) -> None:
        await self._converge(self._wanted(verdict.node, verdict.state), strict=True)

    async def reconcile(self, current: Mapping[str, Verdict]) -> int:
        wanted: dict[str, Backend] = {}
        for node, verdict in sorted(current.items()):
            wanted.update(self._wanted(node, verdict.state))
        return await self._converge(wanted, strict=False)

    async def deliver_weights(self, changes: Sequence[WeightChange]) -> None:
        wanted: dict[str, Backend] = {}
        for change in changes:
            if change.weight == 0 or change.state not in SERVING:
                continue  # the verdict takes the backend out; weight 0 is not nftlb's
            want = Backend(None, self._weight(change.node, change.weight))
            for farm, backend in self.backends.lookup(change.node):
                wanted[f"{farm}/{backend}"] = want
        await self._converge(wanted, strict=False)

    async def close(self) -> None:
        await self.api.close()
