"""Engine snapshots: :meth:`DecisionEngine.to_rows` as one msgpack blob, and back; and the
snapshotter that writes them from a forked child.

Why not pickle: the engine is a graph of ~10^6 small objects (checks point to their
(node, vantage), which point to their node and vantage...). Pickle walks and memoizes that graph
object by object, which takes seconds at 10,000 nodes x 20 vantages. The engine's rows are plain
values whose references are names, so msgspec encodes them in one pass. What the rows hold, and
why that is enough for a restart to continue like an uninterrupted run, is the engine's business
(:meth:`DecisionEngine.to_rows`); this module owns the format version and the encoding.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import stat
from collections.abc import Callable, Iterator
from typing import Any

import msgspec

from probes.mesh.decision import DecisionEngine
from probes.mesh.store import MeshStore, StoreError

log = logging.getLogger(__name__)

SNAPSHOT_VERSION = 2
# version 1: rows from before the contrary-evidence impairment rule (issue 16); the engine loads
# them with that state's defaults, so a mesh upgraded in place restarts from its snapshot
READABLE_VERSIONS = (1, SNAPSHOT_VERSION)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()


class SnapshotError(ValueError):
    """The blob is not a snapshot this build can read."""


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """Hundreds of thousands of rows are built and none is garbage: collecting while building
    them only rescans the engine, over and over (it doubles the time)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def dump_engine(engine: DecisionEngine, weights: dict[str, Any] | None = None,
                paths: dict[str, Any] | None = None) -> bytes:
    """The engine, and the state of the engines beside it: weights
    (``WeightEngine.to_builtins``) and path localisation (``PathEngine.to_rows``)."""
    beside = {"paths": paths} if paths is not None else {}
    with _no_gc():
        return _encoder.encode(
            {"version": SNAPSHOT_VERSION, **engine.to_rows(), "weights": weights, **beside})


def load_engine(blob: bytes) -> DecisionEngine:
    return load_snapshot(blob)[0]


def load_snapshot(
    blob: bytes,
) -> tuple[DecisionEngine, dict[str, Any] | None, dict[str, Any] | None]:
    """The engine, the weight engine's state and the path engine's (each None in a snapshot
    taken without it)."""
    with _no_gc():
        try:
            state: dict[str, Any] = _decoder.decode(blob)
        except msgspec.DecodeError as exc:
            raise SnapshotError(f"not a snapshot: {exc}") from None
        if not isinstance(state, dict) or state.get("version") not in READABLE_VERSIONS:
            raise SnapshotError("unknown snapshot version")
        weights = state.pop("weights", None)
        paths = state.pop("paths", None)
        try:
            return DecisionEngine.from_rows(state), weights, paths
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            # a damaged file: rows missing, or of the wrong shape or type
            raise SnapshotError(f"damaged snapshot: {type(exc).__name__}: {exc}") from None


PRUNE_STEP = 32  # journal rows dropped per step


SNAPSHOT_NICENESS = 10  # a child gets ~10 % of a core the loop keeps busy, all of an idle one


class ForkSnapshotter:
    """Snapshots written by a forked child (copy-on-write: the parent pauses only for fork()),
    and the dropping of the journal a snapshot covers.

    The child serializes the engine as of a committed journal id and writes it through a store
    connection of its own; once it has exited successfully :meth:`reap` drops the journal up to
    that id, a little at a time (as after an in-process snapshot, see :meth:`covered`). One
    child at a time."""

    def __init__(self, store: MeshStore) -> None:
        self.store = store
        self.completed_total = 0
        self._child: tuple[int, int] | None = None  # (pid, journal id)
        self._prune_upto = 0

    @property
    def running(self) -> bool:
        return self._child is not None

    @property
    def busy(self) -> bool:
        """A child is running, or the journal it covered is not pruned yet."""
        return self._child is not None or self._prune_upto > 0

    def start(self, dump: Callable[[], bytes], journal_id: int) -> bool:
        """Fork a child that writes ``dump()`` as the snapshot of ``journal_id`` (none may be
        running). False when fork failed: the caller snapshots in-process."""
        if self._child is not None:
            raise RuntimeError("a snapshot child is still running")
        try:
            with self.store.quiet():  # the store's own threads hold no SQLite lock across it
                pid = os.fork()
        except OSError:
            log.exception("fork for a snapshot failed; snapshotting in-process")
            return False
        if pid == 0:  # the child: no logging (locks), no event loop, leave with os._exit
            code = 1
            try:
                # let go of inherited sockets: a child outliving a killed mesh must not keep its
                # listening port (the restarted mesh binds it again). Files stay open: closing
                # SQLite's descriptors behind its back breaks its lock bookkeeping.
                close_sockets()
                # background work: where it shares a core with the mesh (a pinned mesh's
                # children inherit its core), the event loop serving agents goes first
                os.nice(SNAPSHOT_NICENESS)
                gc.disable()  # a short-lived process: collecting would only touch (copy) pages
                blob = dump()
                self.store.write_snapshot_detached(journal_id, blob)
                code = 0
            except BaseException:  # noqa: S110 - the parent sees the exit code
                pass
            finally:
                os._exit(code)
        self._child = (pid, journal_id)
        return True

    def covered(self, journal_id: int) -> None:
        """A snapshot (made in-process) covers the journal up to ``journal_id``: drop it in
        steps from the next :meth:`reap` on."""
        self._prune_upto = max(self._prune_upto, journal_id)

    def reap(self) -> None:
        """Reap a finished child and drop the journal it covers, a little at a time."""
        if self._child is not None:
            pid, journal_id = self._child
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                self._child = None
                if os.waitstatus_to_exitcode(status) == 0:
                    self._prune_upto = max(self._prune_upto, journal_id)
                    self.completed_total += 1
                else:
                    log.error("snapshot child failed (%s); journal kept", status)
        self.prune_step()

    def prune_step(self) -> None:
        """Drop up to :data:`PRUNE_STEP` rows of covered journal (one after every commit and
        every tick: a row is a whole batch, up to megabytes, and one long delete once stalled
        the writer for 200 ms). A failure only leaves the journal longer a while."""
        if not self._prune_upto:
            return
        try:
            if self.store.prune_journal(self._prune_upto, PRUNE_STEP) == 0:
                self._prune_upto = 0
        except StoreError as exc:
            log.warning("journal not pruned: %s", exc)

    def wait(self) -> None:
        """Wait for a running child (at shutdown: before the parent snapshots and closes)."""
        if self._child is not None:
            os.waitpid(self._child[0], 0)
            self._child = None


def close_sockets() -> None:
    """Close every socket descriptor of this process (a snapshot child's first act)."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return  # no /proc: the port may linger until the child exits, nothing worse
    for name in names:
        fd = int(name)
        try:
            if stat.S_ISSOCK(os.fstat(fd).st_mode):
                os.close(fd)
        except OSError:
            continue  # the listing's own descriptor, already gone

