"""The mesh's durable state behind one interface, so SQLite (embedded) and etcd (HA) can both serve.

Modelled on Patroni's ``AbstractDCS``: the mesh talks only to :class:`MeshStore`; a backend
implements the abstract methods and nothing else. What a backend keeps:

* **journal** — every input of the decision engine in order (agent batches as received, ticks,
  admin actions), each with the ``now`` it was applied at. The engine is deterministic, so the
  engine state is "snapshot + journal after it": a restart loads the snapshot and replays the rest
  without announcing anything (the verdicts those entries produced are already in the log).
* **snapshot** — the engine state as of a journal id; older journal entries can then be dropped
  (a few hundred per step: a long delete would stall every commit queued behind it).
* **verdict log** — every verdict change with an increasing id; it doubles as the publishers'
  outbox: each publisher keeps its own position (the last id it delivered). Verdicts carry the
  store's :attr:`MeshStore.epoch` (:attr:`probes.model.Verdict.epoch`): a new, higher one
  whenever its history may have restarted, so receivers that order by (epoch, seq) follow a
  reset or restored store instead of ignoring its seq 1.
* **node snapshot** — the latest published verdict per node (for queries without the engine).
* **admin states** — DRAINING / MAINTENANCE per node, with who set them and when.
* **agent replay state** — the last accepted ``(epoch, batch_seq)`` per agent.

Atomicity: :meth:`MeshStore.commit` stores one journal entry together with every effect it had
(verdicts, node rows, admin row, agent position), or nothing. The ingest handler applies a batch
to the engine only after every check passed and commits before answering, so an agent that got
no answer can send the same batch again and it is taken exactly once.
"""

from __future__ import annotations

import abc
import contextlib
import enum
from collections.abc import Sequence

import msgspec

from probes.model import Verdict, VerdictState


class EntryKind(enum.StrEnum):
    BATCH = "batch"  # payload: the batch body as received (JSON bytes)
    TICK = "tick"  # payload: empty
    ADMIN = "admin"  # payload: AdminAction as JSON


class AdminAction(msgspec.Struct, frozen=True):
    node: str
    state: VerdictState | None  # None = ready (clear the admin state)
    actor: str = ""


class JournalEntry(msgspec.Struct, frozen=True):
    kind: EntryKind
    now: float
    payload: bytes = b""
    id: int = 0  # assigned by the store


class StoredVerdict(msgspec.Struct, frozen=True):
    id: int  # position in the verdict log (the outbox position)
    verdict: Verdict


class AdminRecord(msgspec.Struct, frozen=True):
    node: str
    state: VerdictState
    actor: str
    at: float


class AgentPosition(msgspec.Struct, frozen=True):
    """An agent's replay position: its instance epoch and the batch_seq within it."""

    agent: str
    batch_seq: int
    epoch: int = 0


class Recovery(msgspec.Struct):
    """What a restart needs: the snapshot (may be empty) and the journal after it."""

    snapshot: bytes | None
    snapshot_journal_id: int
    entries: list[JournalEntry]
    agents: dict[str, tuple[int, int]]  # agent -> (epoch, batch_seq) of its last batch


class StoreError(RuntimeError):
    """The backend failed; the caller must not assume anything was stored. Every write is
    rolled back before this is raised, so the next call starts clean."""


class MeshStore(abc.ABC):
    """Backend interface. Methods are synchronous and short; callers batch their writes."""

    #: the epoch of the verdicts logged through this store (milliseconds since 1970): new and
    #: higher at every start of a SQLite store; a shared one for etcd (stamped when appended)
    epoch: int = 0

    @abc.abstractmethod
    def close(self) -> None:
        """Release the backend; further calls are errors."""

    # ---- writes ---------------------------------------------------------------------------

    @abc.abstractmethod
    def commit(
        self,
        entry: JournalEntry,
        verdicts: Sequence[Verdict],
        agent: AgentPosition | None = None,
        admin: AdminAction | None = None,
        at: float = 0.0,
    ) -> int:
        """Store ``entry`` and all its effects atomically; return the entry's journal id.

        :param entry: the engine input, journaled for replay.
        :param verdicts: the verdict changes it caused, appended to the log and node snapshot.
        :param agent: the agent's new replay position when ``entry`` is a batch.
        :param admin: the admin action when ``entry`` is one (updates the admin states).
        :param at: wall time of an admin action, for the admin record.
        """

    @abc.abstractmethod
    def save_snapshot(self, journal_id: int, blob: bytes) -> None:
        """Store the engine state as of ``journal_id``. The journal up to it is then covered
        and the caller drops it with :meth:`prune_journal`, a little at a time."""

    #: True when :meth:`write_snapshot_detached` is implemented
    supports_detached_snapshot = False

    def write_snapshot_detached(self, journal_id: int, blob: bytes) -> None:
        """Store a snapshot from a forked child process, without touching the parent's
        connections (the parent prunes the journal once the child succeeded). Backends that
        cannot do this raise ``NotImplementedError`` and the mesh snapshots in-process instead."""
        raise NotImplementedError

    def quiet(self) -> contextlib.AbstractContextManager[None]:
        """Hold the backend's own background threads still (a checkpoint) for a moment: the
        mesh forks a snapshot child inside it, so the child inherits no lock they held."""
        return contextlib.nullcontext()

    @abc.abstractmethod
    def prune_journal(self, upto: int, limit: int = 1000) -> int:
        """Drop up to ``limit`` journal entries with id <= ``upto`` (covered by a snapshot);
        return how many were dropped. Done in small steps so the writer never stalls long."""

    @abc.abstractmethod
    def probe_write(self) -> None:
        """A small write that fails like a commit would (a full disk, a read-only file): how a
        mesh whose commits failed learns that the store takes writes again."""

    @abc.abstractmethod
    def ack(self, publisher: str, position: int) -> None:
        """Record that ``publisher`` delivered every verdict up to log id ``position``."""

    # ---- reads ----------------------------------------------------------------------------

    @abc.abstractmethod
    def recover(self) -> Recovery:
        """The snapshot and every journal entry after it, plus the agents' positions."""

    @abc.abstractmethod
    def verdicts(
        self, after: int = 0, limit: int = 1000, node: str | None = None
    ) -> list[StoredVerdict]:
        """Verdict log entries with id > ``after``, oldest first."""

    @abc.abstractmethod
    def node_verdicts(self) -> dict[str, Verdict]:
        """The node snapshot: latest verdict per node."""

    @abc.abstractmethod
    def admin_states(self) -> dict[str, AdminRecord]:
        """Nodes under an admin state."""

    @abc.abstractmethod
    def position(self, publisher: str) -> int:
        """The last verdict log id ``publisher`` acknowledged (0 when none)."""

    @abc.abstractmethod
    def journal_length(self) -> int:
        """Journal entries after the snapshot (what a restart would replay)."""

    # ---- conveniences built on the above ---------------------------------------------------

    def outbox(self, publisher: str, limit: int = 100) -> list[StoredVerdict]:
        """Verdicts ``publisher`` has not acknowledged yet, oldest first."""
        return self.verdicts(after=self.position(publisher), limit=limit)
