"""The HA store: the shared part of the mesh's state in etcd v3, through etcd's JSON gateway.

Every replica ingests and decides on its own engine, so the engine's inputs (journal, snapshot,
agents' positions) stay in a replica-local :class:`SQLiteStore`. What the replicas must agree on
lives in etcd under ``prefix``:

* ``log/<node>/<epoch>-<seq>`` — the verdict log. A verdict is appended in one transaction
  together with ``head/<node>`` (the node's latest verdict), compared on the head's
  ``mod_revision``: the first replica to decide ``node:seq`` writes it, the others find it there
  and skip it.
* ``epoch`` — the epoch every verdict in etcd carries (created with the prefix, in milliseconds):
  shared, so verdicts of every replica order the same way at the receivers. Delete it after
  restoring etcd from a backup: the next verdict creates a new, higher one. Per-node
  sequence numbers therefore live in etcd and survive any replica's failure. A verdict's log id
  is the etcd revision that created its key, so the log is revision-ordered across replicas.
* ``admin/<node>`` — admin states, shared by all replicas.
* ``pos/<publisher>`` — each publisher's outbox position (an etcd revision). It is written only
  while the writer holds the leader key with its own lease (a txn compare on the key's value and
  lease): a deposed leader's acknowledgement fails at the store (fencing).

Replica-local verdicts reach etcd through a local "etcd" outbox position: after every commit the
replica appends what it has not synced yet, oldest first. When etcd is unreachable they wait in
the local log and go out with the next commit, in order; nothing a replica decided is dropped.

The client is :mod:`urllib` (stdlib): the gateway speaks plain JSON over HTTP, the store's
interface is synchronous, and the ``etcd3`` PyPI client is unmaintained and pins old grpc and
protobuf releases (see docs/ha.md).
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import msgspec

from probes.mesh.store import (
    AdminAction,
    AdminRecord,
    AgentPosition,
    JournalEntry,
    MeshStore,
    Recovery,
    StoredVerdict,
    StoreError,
)
from probes.mesh.store_sqlite import SQLiteStore
from probes.model import Verdict, VerdictState, decode_verdict, encode

log = logging.getLogger(__name__)

SYNC_POSITION = "__etcd__"  # the local outbox position of verdicts already appended to etcd
_CAS_ATTEMPTS = 8


class EtcdError(StoreError):
    """No endpoint answered, or etcd answered with an error."""


class Fenced(StoreError):
    """A leader-only write was refused: this replica does not hold the leader key any more."""


def now_ms() -> int:
    return int(time.time() * 1000)


def b64(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return base64.b64encode(raw).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


def prefix_end(prefix: str) -> str:
    """The ``range_end`` that selects every key starting with ``prefix`` (base64)."""
    raw = bytearray(prefix.encode())
    raw[-1] += 1  # prefixes here end in "/", never 0xff
    return b64(bytes(raw))


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int


def _kv(raw: dict[str, Any]) -> KeyValue:
    return KeyValue(unb64(raw["key"]).decode(), unb64(raw.get("value", "")),
                    int(raw.get("create_revision", 0)), int(raw.get("mod_revision", 0)),
                    int(raw.get("lease", 0)))


class EtcdClient:
    """A small, thread-safe etcd v3 JSON-gateway client with endpoint failover."""

    def __init__(self, endpoints: Sequence[str], timeout: float = 1.0,
                 fail_fast_seconds: float = 0.0) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint")
        if any(not e.startswith(("http://", "https://")) for e in endpoints):
            raise ValueError("etcd endpoints are http:// or https:// URLs")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.timeout = timeout
        # after every endpoint failed, fail at once for this long instead of waiting out the
        # timeouts again: a caller on the event loop (ingest, API) must not stall on each call
        self.fail_fast_seconds = fail_fast_seconds
        self._down_until = 0.0
        self._preferred = 0

    def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        if self.fail_fast_seconds and time.monotonic() < self._down_until:
            raise EtcdError(f"etcd {path}: every endpoint failed moments ago")
        data = json.dumps(body).encode()
        errors = []
        n = len(self.endpoints)
        for i in range(n):
            index = (self._preferred + i) % n
            req = urllib.request.Request(  # noqa: S310 - endpoints are validated http(s) URLs
                self.endpoints[index] + path, data=data, method="POST",
                headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:  # noqa: S310
                    answer: dict[str, Any] = json.load(r)
            except urllib.error.HTTPError as exc:  # etcd answered: an error, not an outage
                detail = exc.read()[:200].decode(errors="replace")
                errors.append(f"{self.endpoints[index]}: {exc.code} {detail}")
                continue
            except (OSError, ValueError, http.client.HTTPException) as exc:
                # refused, timed out, reset, cut short (IncompleteRead), not JSON
                errors.append(f"{self.endpoints[index]}: {type(exc).__name__}: {exc}")
                continue
            if "header" not in answer and "result" not in answer:  # an error object
                errors.append(f"{self.endpoints[index]}: {str(answer)[:200]}")
                continue
            self._preferred = index
            return answer
        self._down_until = time.monotonic() + self.fail_fast_seconds
        raise EtcdError(f"etcd {path} failed: " + "; ".join(errors))

    # ---- kv -------------------------------------------------------------------------------

    def get(self, key: str) -> KeyValue | None:
        kvs = self.call("/v3/kv/range", {"key": b64(key)}).get("kvs", [])
        return _kv(kvs[0]) if kvs else None

    def range_prefix(self, prefix: str, *, min_create_revision: int = 0, limit: int = 0,
                     by_create: bool = False) -> list[KeyValue]:
        body: dict[str, Any] = {"key": b64(prefix), "range_end": prefix_end(prefix)}
        if min_create_revision:
            body["min_create_revision"] = str(min_create_revision)
        if limit:
            body["limit"] = str(limit)
        if by_create:
            body["sort_order"] = "ASCEND"
            body["sort_target"] = "CREATE"
        return [_kv(kv) for kv in self.call("/v3/kv/range", body).get("kvs", [])]

    def put(self, key: str, value: bytes, lease: int = 0) -> int:
        body: dict[str, Any] = {"key": b64(key), "value": b64(value)}
        if lease:
            body["lease"] = str(lease)
        return int(self.call("/v3/kv/put", body)["header"]["revision"])

    def delete(self, key: str) -> None:
        self.call("/v3/kv/deleterange", {"key": b64(key)})

    def txn(self, compare: list[dict[str, Any]], success: list[dict[str, Any]],
            failure: Sequence[dict[str, Any]] = ()) -> tuple[bool, int]:
        """Run a transaction; (whether the compares held, the revision after it)."""
        answer = self.call("/v3/kv/txn", {"compare": compare, "success": success,
                                          "failure": list(failure)})
        return bool(answer.get("succeeded", False)), int(answer["header"]["revision"])

    # ---- leases ---------------------------------------------------------------------------

    def lease_grant(self, ttl: int) -> tuple[int, int]:
        answer = self.call("/v3/lease/grant", {"TTL": str(ttl)})
        if answer.get("error"):
            raise EtcdError(f"lease grant: {answer['error']}")
        return int(answer["ID"]), int(answer["TTL"])

    def lease_keepalive(self, lease: int) -> int:
        """The lease's new TTL in seconds; 0 when it has expired."""
        result = self.call("/v3/lease/keepalive", {"ID": str(lease)}).get("result", {})
        return int(result.get("TTL", 0))

    def lease_revoke(self, lease: int) -> None:
        self.call("/v3/lease/revoke", {"ID": str(lease)})


# ---- compare / request builders ------------------------------------------------------------

def cmp_mod(key: str, revision: int) -> dict[str, Any]:
    return {"key": b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": str(revision)}


def cmp_created(key: str, revision: int) -> dict[str, Any]:
    return {"key": b64(key), "target": "CREATE", "result": "EQUAL",
            "create_revision": str(revision)}


def cmp_value(key: str, value: bytes) -> dict[str, Any]:
    return {"key": b64(key), "target": "VALUE", "result": "EQUAL", "value": b64(value)}


def cmp_lease(key: str, lease: int) -> dict[str, Any]:
    return {"key": b64(key), "target": "LEASE", "result": "EQUAL", "lease": str(lease)}


def req_put(key: str, value: bytes, lease: int = 0) -> dict[str, Any]:
    put: dict[str, Any] = {"key": b64(key), "value": b64(value)}
    if lease:
        put["lease"] = str(lease)
    return {"request_put": put}


@dataclass(frozen=True, slots=True)
class FenceToken:
    """What a leader-only write compares: the leader key holds our name under our lease."""

    key: str
    holder: str
    lease: int

    def compares(self) -> list[dict[str, Any]]:
        return [cmp_value(self.key, self.holder.encode()), cmp_lease(self.key, self.lease)]


class EtcdStore(MeshStore):
    supports_detached_snapshot = True

    def __init__(self, client: EtcdClient, prefix: str, local_path: str | Path,
                 durability: Literal["normal", "full"] = "normal") -> None:
        self.client = client
        self.prefix = prefix.rstrip("/") + "/"
        self.local = SQLiteStore(local_path, durability)
        self.epoch = self.local.epoch  # locally; appended to etcd with the shared one
        # set by the leader elector while this replica leads; None = leader-only writes refused
        self.fence: FenceToken | None = None
        self.unsynced = 0  # verdicts decided here and not yet in etcd (etcd was unreachable)
        # after a failed sync, commits do not wait on etcd again for a while (ingest stays fast)
        self.sync_backoff = 1.0
        self._sync_after = 0.0
        self._epoch = 0

    def key(self, *parts: str) -> str:
        return self.prefix + "/".join(parts)

    def close(self) -> None:
        self.local.close()

    # ---- writes ---------------------------------------------------------------------------

    def commit(self, entry: JournalEntry, verdicts: Sequence[Verdict],
               agent: AgentPosition | None = None, admin: AdminAction | None = None,
               at: float = 0.0) -> int:
        journal_id = self.local.commit(entry, verdicts, agent, admin, at)
        if admin is not None:
            try:
                self._share_admin(admin, at)
            except EtcdError as exc:
                log.error("admin state of %s not shared: %s", admin.node, exc)
        self.sync()
        return journal_id

    def _share_admin(self, admin: AdminAction, at: float) -> None:
        key = self.key("admin", admin.node)
        if admin.state is None:
            self.client.delete(key)
            return
        record = AdminRecord(admin.node, admin.state, admin.actor, at)
        self.client.put(key, encode(record))

    def sync(self) -> int:
        """Append the verdicts decided here to the shared log, oldest first; how many went.

        Stops at the first etcd failure: the rest goes out later, still in order."""
        sent = 0
        if time.monotonic() < self._sync_after:
            self.unsynced = len(self.local.outbox(SYNC_POSITION, 10_000))
            return 0
        try:
            while True:
                pending = self.local.outbox(SYNC_POSITION, 200)
                if not pending:
                    break
                for stored in pending:
                    self.append(stored.verdict)
                    self.local.ack(SYNC_POSITION, stored.id)
                    sent += 1
        except Exception as exc:
            log.warning("verdicts not yet in etcd (kept locally, retried): %s", exc)
            self._sync_after = time.monotonic() + self.sync_backoff
        self.unsynced = len(self.local.outbox(SYNC_POSITION, 10_000))
        return sent

    def shared_epoch(self) -> int:
        """The epoch of the shared log: read, or created (milliseconds now) if absent."""
        if not self._epoch:
            key = self.key("epoch")
            self.client.txn([cmp_created(key, 0)], [req_put(key, str(now_ms()).encode())])
            current = self.client.get(key)
            if current is None:
                raise EtcdError(f"{key}: not readable after creating it")
            self._epoch = int(current.value)
        return self._epoch

    def append(self, verdict: Verdict) -> int | None:
        """Append ``verdict`` to the shared log unless its ``node:seq`` (or a later one) is there.

        Returns the new log id, or None when another replica got there first."""
        verdict = msgspec.structs.replace(verdict, epoch=self.shared_epoch())
        head_key = self.key("head", verdict.node)
        body = encode(verdict)
        for _ in range(_CAS_ATTEMPTS):
            head = self.client.get(head_key)
            if head is not None and decode_verdict(head.value).order >= verdict.order:
                return None
            ok, revision = self.client.txn(
                [cmp_mod(head_key, head.mod_revision if head else 0)],
                [req_put(head_key, body),
                 req_put(self.key("log", verdict.node,
                                  f"{verdict.epoch:013d}-{verdict.seq:012d}"), body)],
            )
            if ok:
                return revision
        raise EtcdError(f"appending {verdict.idempotency_key}: too much contention")

    def quiet(self) -> contextlib.AbstractContextManager[None]:
        return self.local.quiet()

    def probe_write(self) -> None:
        self.local.probe_write()  # etcd being away is handled by the sync backoff

    def save_snapshot(self, journal_id: int, blob: bytes) -> None:
        self.local.save_snapshot(journal_id, blob)

    def write_snapshot_detached(self, journal_id: int, blob: bytes) -> None:
        self.local.write_snapshot_detached(journal_id, blob)

    def prune_journal(self, upto: int, limit: int = 1000) -> int:
        return self.local.prune_journal(upto, limit)

    def ack(self, publisher: str, position: int) -> None:
        """Move ``publisher``'s shared position forward; only the current leader may."""
        fence = self.fence
        if fence is None:
            raise Fenced(f"{publisher}: not the leader, position not stored")
        key = self.key("pos", publisher)
        for _ in range(_CAS_ATTEMPTS):
            current = self.client.get(key)
            if current is not None and int(current.value) >= position:
                return
            ok, _ = self.client.txn(
                [*fence.compares(), cmp_mod(key, current.mod_revision if current else 0)],
                [req_put(key, str(position).encode())],
            )
            if ok:
                return
            holder = self.client.get(fence.key)
            if holder is None or (holder.lease, holder.value) != (fence.lease,
                                                                  fence.holder.encode()):
                raise Fenced(f"{publisher}: {fence.holder} under lease {fence.lease} "
                             "does not hold the leader key")
        raise EtcdError(f"{publisher}: position not stored: too much contention")

    # ---- reads ----------------------------------------------------------------------------

    def recover(self) -> Recovery:
        return self.local.recover()

    def verdicts(self, after: int = 0, limit: int = 1000,
                 node: str | None = None) -> list[StoredVerdict]:
        prefix = self.key("log", node) + "/" if node else self.key("log") + "/"
        kvs = self.client.range_prefix(prefix, min_create_revision=after + 1, limit=limit,
                                       by_create=True)
        return [StoredVerdict(kv.create_revision, decode_verdict(kv.value)) for kv in kvs]

    def node_verdicts(self) -> dict[str, Verdict]:
        heads = self.client.range_prefix(self.key("head") + "/")
        return {v.node: v for v in (decode_verdict(kv.value) for kv in heads)}

    def admin_states(self) -> dict[str, AdminRecord]:
        rows = self.client.range_prefix(self.key("admin") + "/")
        records = (msgspec.json.decode(kv.value, type=AdminRecord) for kv in rows)
        return {r.node: r for r in records if r.state in (VerdictState.DRAINING,
                                                          VerdictState.MAINTENANCE)}

    def position(self, publisher: str) -> int:
        current = self.client.get(self.key("pos", publisher))
        return int(current.value) if current is not None else 0

    def journal_length(self) -> int:
        return self.local.journal_length()
