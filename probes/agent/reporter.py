"""Observations to every mesh endpoint: sequence numbers, disk spool, signed batches, retries.

Path of one observation:

1. :meth:`Reporter.submit` gives it the next per-agent ``seq`` and queues it in memory;
2. the writer task group-commits the queue to the :class:`~probes.agent.spool.Spool` every
   ``COMMIT_INTERVAL`` (one fsync per commit, on the spool's own thread). From here on it survives
   a SIGKILL; before, it is as lost as the probes in flight, and its seq is reused, so the mesh
   never sees a gap it cannot explain. The same commit (:meth:`Spool.commit`: one transaction)
   records the acknowledgements of the batches the mesh took since the last one, and the next
   batch of each sender waiting for one, which it hands to that sender: a batch of what this
   commit appended is sent from memory (its observations in columns without decoding their
   JSON again), never read back;
3. one sender task per endpoint POSTs the batch it is handed (its in-flight batch after a
   restart, then whatever follows its offset), signed with :mod:`probes.model.signing`, in the
   agent instance's epoch (:class:`probes.model.ObservationBatch`): as JSON, or
   in columns (:mod:`probes.model.columnar`) to an endpoint whose last answer listed
   ``"columnar"`` in ``accepts``; a columnar batch refused with 400/413 goes again at once as
   JSON, which every mesh takes. An accepted batch's acknowledgement is committed with the next
   group commit, at once when the spool holds more for that endpoint (a backlog goes out a
   batch per commit); a SIGKILL before it resends the batch, answered ``409 replay``. A 2xx
   answer
   acknowledges it (result ``ok``). A ``409 replay`` names the agent's position at the mesh:
   when it is in the batch's own epoch at or above its batch_seq, the mesh committed the batch
   earlier (the answer to that attempt was lost): acknowledged, result ``duplicate``. Otherwise
   the mesh holds a newer epoch of this agent (its clock went back across a lost state, or a
   second instance runs under the same name): the batch was *refused*, never delivered. It is
   kept, logged at warning with the reason, counted (result ``refused``) and sent again at once
   in a new epoch above the mesh's. Other answers are retried with exponential backoff and
   jitter. 400/413 (the mesh will never accept this body) drop the batch, counted (``rejected``).
4. a 2xx answer may carry ``reprobe``: checks another vantage saw fail, which the mesh asks this
   agent to re-probe now (corroboration on demand); they go to ``on_reprobe`` (the scheduler).

Nothing within spool capacity is lost; beyond it the oldest observations go first, counted in
``tunnelwatch_spool_dropped_observations_total``.

Path traces ride along (:meth:`Reporter.submit_trace`): each endpoint has a bounded in-memory
queue of them, and a batch carries up to ``TRACES_PER_BATCH`` — but only to an endpoint whose
last answer listed ``"traces"`` in ``accepts`` (a mesh from before path evidence refuses fields
it does not know, and must keep getting the observations). If a batch with traces is refused
(400/413), it is sent again at once without them and that endpoint gets no traces for
``TRACE_REFUSAL_BACKOFF``: traces never cost an observation. They are evidence, not state: the
ones queued when the agent stops are gone (the next change or baseline traces again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import msgspec

from probes.agent.metrics import ReporterStats
from probes.agent.spool import Batch, Spool
from probes.aio import wait_at_most
from probes.logutil import RateLimitedLog
from probes.model import Observation, PathTrace, batch_body, signing
from probes.model.columnar import columnar_body, columnar_body_of_json

log = logging.getLogger(__name__)
trouble = RateLimitedLog(log)  # a full disk fails every commit: one line per 10 s, not 10 a second

COMMIT_INTERVAL = 0.1  # group commit: one fsync per interval, whatever the probe rate
# an urgent observation (a failure, a re-probe the mesh asked for: what a verdict may wait on)
# is committed and sent at once, but commits never come closer than this: a vantage failing
# everything costs 50 fsyncs a second, not one per result
URGENT_SPACING = 0.02
BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 30.0
POST_TIMEOUT = 10.0
MAX_PENDING = 100_000  # observations held in memory while the spool cannot be written
_PERMANENT = (400, 413)  # the mesh will never take this body: drop the batch, count it
TRACE_QUEUE_MAX = 256  # traces waiting per endpoint; beyond it the oldest go
TRACES_PER_BATCH = 16
TRACE_REFUSAL_BACKOFF = 600.0  # seconds without traces to an endpoint that refused them

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class _Outgoing:
    """A batch recorded in flight, to be POSTed; ``observations``: its observations when this
    process committed them (the columnar body is made from them: decoding the batch's JSON
    again cost the event loop ~2 us an observation)."""

    batch: Batch
    observations: list[Observation] | None = None


MAX_REPROBE_REQUESTS = 1000  # per reply: a mesh cannot make an agent take more at once


def reprobe_requests(reply: bytes) -> list[tuple[str, str]]:
    """The ``reprobe`` list of a mesh's 2xx answer: ``[[node, check], ...]``, re-probes the mesh
    asks for because another vantage saw those checks fail. Anything malformed is ignored (an
    older mesh sends none; a reply is never a reason to fail a delivered batch)."""
    asks = _reply_object(reply).get("reprobe")
    if not isinstance(asks, list):
        return []
    return [(a[0], a[1]) for a in asks[:MAX_REPROBE_REQUESTS]
            if isinstance(a, list) and len(a) == 2 and all(isinstance(x, str) for x in a)]


def accepts_field(reply: bytes, name: str) -> bool:
    """Whether a mesh's 2xx answer lists ``name`` among the optional batch fields it takes
    (``"accepts": ["traces", "epoch"]``; an older mesh sends no such list)."""
    accepts = _reply_object(reply).get("accepts")
    return isinstance(accepts, list) and name in accepts


def _reply_object(reply: bytes) -> dict[str, Any]:
    try:
        data = msgspec.json.decode(reply)
    except msgspec.DecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def batch_url(endpoint: str) -> str:
    """A bare mesh URL (``http://mesh:9480``) means its ingest path, ``/v1/batches``."""
    scheme, sep, rest = endpoint.partition("://")
    if "/" not in rest.rstrip("/"):
        return f"{scheme}{sep}{rest.rstrip('/')}/v1/batches"
    return endpoint


class Reporter:
    def __init__(self, *, agent: str, endpoints: list[str], key_id: str, key: bytes,
                 spool_path: Path, spool_max_bytes: int, batch_max: int = 500,
                 flush_interval: float = 1.0, stats: ReporterStats | None = None,
                 wall: Callable[[], float] = time.time) -> None:
        self.agent = agent
        self.endpoints = list(endpoints)
        self.key_id = key_id
        self.key = key
        self.batch_max = batch_max
        self.flush_interval = flush_interval
        self.stats = stats or ReporterStats()
        self.stats.endpoints = len(self.endpoints)
        self.stats.spool_capacity_bytes = spool_max_bytes
        self.wall = wall
        self._spool_path = spool_path
        self._spool_max = spool_max_bytes
        self._spool: Spool | None = None
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool")
        self._pending: list[tuple[int, bytes]] = []
        self._pending_objects: list[Observation] = []  # the same observations, unencoded
        self._memory_dropped = 0  # dropped while the spool could not be written
        self._next_seq = 0
        self._encoder = msgspec.json.Encoder()
        self._wake = asyncio.Event()  # the writer: commit now
        self._urgent = False  # ... for an urgent observation (after URGENT_SPACING)
        # per endpoint: the batch its sender is to POST (handed by a commit), the batch the mesh
        # took whose acknowledgement the next commit records, whether its sender waits for a
        # batch (and the event that wakes it), the last seq it was sent (None: ask the spool)
        self._outbox: dict[str, _Outgoing] = {}
        self._acks: dict[str, Batch] = {}
        self._wanting: set[str] = set()
        self._handed: dict[str, asyncio.Event] = {}
        self._position: dict[str, int | None] = {}
        self._top = -1  # the last seq committed to the spool
        self._tasks: list[asyncio.Task[None]] = []
        self._senders: dict[str, asyncio.Task[None]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._closing = False
        # called with the re-probes a mesh asks for in its reply (the agent's scheduler)
        self.on_reprobe: Callable[[list[tuple[str, str]]], None] | None = None
        self._traces: dict[str, deque[bytes]] = {}  # endpoint -> encoded traces waiting
        self._takes_traces: dict[str, bool] = {}  # endpoint -> its last answer accepts them
        self._takes_epoch: dict[str, bool] = {}  # endpoint -> it takes instance epochs (unset:
        # not heard from yet, so the epoch is sent; an older mesh refuses it and is then spared)
        self._traces_refused_until: dict[str, float] = {}
        # endpoint -> its last answer listed "columnar": batches to it go columnar (wire format
        # 2, probes.model.columnar); JSON to the others, and to every endpoint not heard from
        self._takes_columnar: dict[str, bool] = {}

    async def _db(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._io, partial(fn, *args))

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        self._spool = await self._db(Spool, self._spool_path, self._spool_max, self.wall)
        await self._db(self._spool.forget_endpoints, self.endpoints)
        self._next_seq = self._spool.next_seq
        self._top = self._spool.next_seq - 1
        self.stats.dropped_total = self._spool.dropped
        await self._refresh_stats()
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=POST_TIMEOUT))
        self._tasks.append(asyncio.create_task(self._writer(), name="spool-writer"))
        for endpoint in self.endpoints:
            self._start_sender(endpoint)
        log.info("reporter: %d endpoint(s), spool %s holds %d observation(s), epoch %d, "
                 "next seq %d", len(self.endpoints), self._spool_path, self.stats.spool_depth,
                 self._spool.epoch, self._next_seq)

    def _start_sender(self, endpoint: str) -> None:
        self._handed[endpoint] = asyncio.Event()
        self._position[endpoint] = None
        self._senders[endpoint] = asyncio.create_task(self._sender(endpoint),
                                                      name=f"sender-{endpoint}")

    async def set_endpoints(self, endpoints: list[str]) -> None:
        """Reload: start senders for new endpoints, stop removed ones, keep the spool."""
        removed = [e for e in self.endpoints if e not in endpoints]
        for endpoint in removed:
            task = self._senders.pop(endpoint)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self._traces.pop(endpoint, None)
            self._takes_traces.pop(endpoint, None)
            self._takes_epoch.pop(endpoint, None)
            self._takes_columnar.pop(endpoint, None)
            self._outbox.pop(endpoint, None)
            self._acks.pop(endpoint, None)
            self._handed.pop(endpoint, None)
            self._position.pop(endpoint, None)
            self._wanting.discard(endpoint)
        self.endpoints = list(endpoints)
        self.stats.endpoints = len(self.endpoints)
        if self._spool is not None:
            await self._db(self._spool.forget_endpoints, self.endpoints)
        for endpoint in self.endpoints:
            if endpoint not in self._senders:
                self._start_sender(endpoint)

    async def close(self, drain_timeout: float = 5.0) -> None:
        """Commit everything queued; give the senders ``drain_timeout`` to deliver; stop."""
        self._closing = True
        await self.commit()
        if drain_timeout > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(drain_timeout):
                    while self.stats.spool_depth > 0 or self._acks:
                        self._wake.set()
                        await asyncio.sleep(0.05)
        for task in [*self._tasks, *self._senders.values()]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._senders.values(), return_exceptions=True)
        self._wanting.clear()
        try:  # what the mesh took is not sent again after a restart
            await self.commit()
        except Exception as exc:  # it would be: answered 409 replay, acknowledged then
            log.warning("reporter: acknowledgements not committed at close: %s", exc)
        if self._session is not None:
            await self._session.close()
        if self._spool is not None:
            await self._db(self._spool.close)
        self._io.shutdown(wait=True)

    # ---------------------------------------------------------------- intake

    def submit(self, observation_without_seq: Callable[[int], Observation],
               urgent: bool = False) -> int:
        """Queue one observation; ``observation_without_seq(seq)`` builds it. Returns its seq.
        ``urgent``: commit and send it now rather than at the next group commit."""
        seq = self._next_seq
        self._next_seq += 1
        observation = observation_without_seq(seq)
        self._pending.append((seq, self._encoder.encode(observation)))
        self._pending_objects.append(observation)
        if urgent:
            self._urgent = True
            self._wake.set()
        return seq

    def submit_trace(self, trace: PathTrace) -> None:
        """Queue a path trace for every endpoint (bounded; the oldest go first)."""
        body = self._encoder.encode(trace)
        for endpoint in self.endpoints:
            queue = self._traces.setdefault(endpoint, deque())
            queue.append(body)
            if len(queue) > TRACE_QUEUE_MAX:
                queue.popleft()
                self._count_dropped_traces("queue-full", 1)

    def _count_dropped_traces(self, reason: str, n: int) -> None:
        dropped = self.stats.traces_dropped_total
        dropped[reason] = dropped.get(reason, 0) + n

    def _take_traces(self, endpoint: str) -> list[bytes]:
        queue = self._traces.get(endpoint)
        if (not queue or not self._takes_traces.get(endpoint)
                or self.wall() < self._traces_refused_until.get(endpoint, 0.0)):
            return []
        return [queue.popleft() for _ in range(min(TRACES_PER_BATCH, len(queue)))]

    def _give_back(self, endpoint: str, traces: list[bytes]) -> None:
        queue = self._traces.setdefault(endpoint, deque())
        queue.extendleft(reversed(traces))
        while len(queue) > TRACE_QUEUE_MAX:
            queue.pop()
            self._count_dropped_traces("queue-full", 1)

    async def commit(self) -> None:
        """Commit what was submitted, the acknowledgements of the batches the mesh took, and
        the next batch of every sender waiting for one, in one spool transaction; hand those
        batches to their senders."""
        if self._spool is None:
            return
        wanting = [e for e in self.endpoints if e in self._wanting and e not in self._outbox]
        if not (self._pending or self._acks or any(self._may_have_more(e) for e in wanting)):
            return
        records, objects = self._pending, self._pending_objects
        self._pending, self._pending_objects = [], []
        acks, self._acks = self._acks, {}
        self._wanting.difference_update(wanting)
        try:
            done = await self._db(self._spool.commit, records, list(acks.values()), wanting,
                                  list(self.endpoints), self.batch_max)
        except Exception:
            self._put_back(records, objects, acks, wanting)
            raise
        # another commit may have come after this one on the spool's thread: only this one's
        # top says what a sender given no batch has had
        self._top = max(self._top, done.top)
        for endpoint in wanting:
            if endpoint not in self._handed:  # removed by a reload meanwhile
                continue
            batch = done.batches.get(endpoint)
            if batch is None:
                self._position[endpoint] = done.top  # it has had everything committed
                self._wanting.add(endpoint)
                continue
            if self._position[endpoint] is None:  # it has had what comes before its batch
                self._position[endpoint] = batch.first_seq - 1
            self._outbox[endpoint] = _Outgoing(batch, _objects_of(batch, records, objects))
            self._wanting.discard(endpoint)  # its sender may have asked again meanwhile
            self._handed[endpoint].set()
        if done.dropped:
            log.warning("spool full (%d bytes): dropped the %d oldest observation(s)",
                        self._spool_max, done.dropped)
        if any(self._may_have_more(e) for e in self._wanting):
            self._wake.set()  # committed meanwhile by a commit that did not take its batch
        self.stats.dropped_total = self._spool.dropped + self._memory_dropped
        self.stats.spool_depth = done.depth
        self.stats.spool_bytes = self._spool.bytes

    def _put_back(self, records: list[tuple[int, bytes]], objects: list[Observation],
                  acks: dict[str, Batch], wanting: list[str]) -> None:
        """A commit failed (a full disk may clear): what it held waits for the next one, the
        observations bounded like the spool."""
        assert self._spool is not None
        self._pending = records + self._pending
        self._pending_objects = objects + self._pending_objects
        excess = len(self._pending) - MAX_PENDING
        if excess > 0:
            del self._pending[:excess]
            del self._pending_objects[:excess]
            self._memory_dropped += excess
            self.stats.dropped_total = self._spool.dropped + self._memory_dropped
        for endpoint, batch in acks.items():
            if endpoint in self._handed:
                self._acks.setdefault(endpoint, batch)
        self._wanting.update(e for e in wanting if e in self._handed)

    def _count_taken(self, endpoint: str, batch: Batch) -> None:
        """The endpoint has the batch: its position, and the spool depth gauge at once (the
        acknowledgement is committed, and the depth counted again, by the next commit). The
        observations no longer waiting are the head of the batch up to the lowest position of
        all endpoints, when this one was the lowest."""
        before = self._lowest_position()
        self._position[endpoint] = batch.last_seq
        after = self._lowest_position()
        if before is not None and after is not None and after > before:
            taken = len(batch.bodies) if after == batch.last_seq else after - before
            self.stats.spool_depth = max(0, self.stats.spool_depth - min(taken,
                                                                         len(batch.bodies)))

    def _lowest_position(self) -> int | None:
        positions = [self._position.get(e) for e in self.endpoints]
        return None if None in positions else min(p for p in positions if p is not None)

    def _may_have_more(self, endpoint: str) -> bool:
        """Whether the spool may hold observations the endpoint has not been sent."""
        position = self._position.get(endpoint)
        return position is None or position < self._top

    async def _refresh_stats(self) -> None:
        assert self._spool is not None
        self.stats.spool_depth = await self._db(self._spool.depth, self.endpoints)
        self.stats.spool_bytes = self._spool.bytes

    async def _writer(self) -> None:
        while True:
            await wait_at_most(self._wake, COMMIT_INTERVAL)
            if self._urgent:
                await asyncio.sleep(URGENT_SPACING)  # let what finishes with it come along
            self._wake.clear()
            self._urgent = False
            try:
                await self.commit()
            except Exception as exc:  # a full disk must not kill the agent; keep trying
                trouble("commit", "spool commit failed (%d observation(s) held in memory): %s",
                        len(self._pending), exc)

    # ---------------------------------------------------------------- sending

    async def _sender(self, endpoint: str) -> None:
        backoff = BACKOFF_INITIAL
        while True:
            try:
                backoff = await self._send_next(endpoint, backoff)
            except Exception as exc:  # the spool failed (a full disk): nothing lost, retried
                trouble(f"send:{endpoint}", "reporting to an endpoint paused: spool: %s", exc)
                await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, BACKOFF_MAX)

    async def _send_next(self, endpoint: str, backoff: float) -> float:
        """Send the endpoint's batch (or wait for one); the backoff to use next."""
        assert self._spool is not None
        index = str(self.endpoints.index(endpoint))  # a reload may reorder endpoints
        outgoing = self._outbox.get(endpoint)
        if outgoing is None:
            self._wanting.add(endpoint)
            if self._may_have_more(endpoint):
                self._wake.set()  # a backlog, or the spool not asked yet: commit at once
            handed = self._handed[endpoint]
            handed.clear()
            await wait_at_most(handed, self.flush_interval)
            return backoff
        batch = outgoing.batch
        result = await self._post(endpoint, outgoing)
        key = (index, result)
        self.stats.batches_total[key] = self.stats.batches_total.get(key, 0) + 1
        if result == "refused":  # kept: its observations go again at once, in a new epoch
            await self._db(self._spool.requeue, endpoint)
            del self._outbox[endpoint]
            self._position[endpoint] = None
            return backoff
        if result in ("ok", "duplicate", "rejected"):
            del self._outbox[endpoint]
            self._acks[endpoint] = batch
            self._count_taken(endpoint, batch)
            if result != "rejected":
                self.stats.sent_total[index] = (self.stats.sent_total.get(index, 0)
                                                + len(batch.bodies))
                self.stats.last_success[index] = self.wall()
            return BACKOFF_INITIAL
        await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
        return min(backoff * 2, BACKOFF_MAX)

    async def _post(self, endpoint: str, outgoing: _Outgoing) -> str:
        """POST one batch: "ok" (accepted), "duplicate" (committed earlier), "refused" (a newer
        epoch of this agent at the mesh: kept), "rejected" (never takes it), or "error".
        Path traces the endpoint takes ride along; they are put back when the batch did not
        go through, and left out (and dropped) when it was refused with them."""
        batch = outgoing.batch
        traces = self._take_traces(endpoint)
        result = await self._post_body(endpoint, outgoing, traces)
        if result == "rejected" and batch.epoch and endpoint not in self._takes_epoch:
            # the first answer of this endpoint refused the batch: a mesh from before epochs
            # refuses the field. It gets the batch again without it, and never the field again
            log.warning("mesh endpoint %s refused a batch with an instance epoch: sending "
                        "without (a mesh from before epochs: upgrade it, or an agent that loses "
                        "its state_dir is refused as a replay until its batch_seq catches up)",
                        self.endpoints.index(endpoint))
            self._takes_epoch[endpoint] = False
            result = await self._post_body(endpoint, outgoing, traces)
        if result == "rejected" and self._takes_columnar.pop(endpoint, False):
            # a mesh that listed "columnar" refused a columnar body (downgraded since): the JSON
            # batch, which every mesh takes, goes instead (columnar again once an answer lists it)
            trouble(f"columnar:{endpoint}", "mesh endpoint %s refused a columnar batch: sending "
                    "it again as JSON", self.endpoints.index(endpoint))
            result = await self._post_body(endpoint, outgoing, traces)
        if not traces:
            return result
        index = str(self.endpoints.index(endpoint))
        if result in ("ok", "duplicate"):
            sent = self.stats.traces_sent_total
            sent[index] = sent.get(index, 0) + len(traces)
        elif result == "rejected":
            log.warning("mesh endpoint %s refused a batch carrying %d path trace(s): sending it "
                        "again without them; no traces to it for %.0f s", index, len(traces),
                        TRACE_REFUSAL_BACKOFF)
            self._count_dropped_traces("refused", len(traces))
            self._traces_refused_until[endpoint] = self.wall() + TRACE_REFUSAL_BACKOFF
            result = await self._post_body(endpoint, outgoing, [])
        else:
            self._give_back(endpoint, traces)
        return result

    async def _post_body(self, endpoint: str, outgoing: _Outgoing, traces: list[bytes]) -> str:
        assert self._session is not None
        batch = outgoing.batch
        now = self.wall()
        epoch = batch.epoch if self._takes_epoch.get(endpoint, True) else 0
        body = None
        if self._takes_columnar.get(endpoint):
            if outgoing.observations is not None:
                body = columnar_body(self.agent, batch.batch_seq, now, outgoing.observations,
                                     traces, epoch=epoch)
            else:
                body = columnar_body_of_json(self.agent, batch.batch_seq, now, batch.bodies,
                                             traces, epoch=epoch)
        if body is None:
            body = batch_body(self.agent, batch.batch_seq, now, batch.bodies, traces, epoch=epoch)
        headers = signing.signed_headers(self.agent, self.key_id, self.key, body, now)
        try:
            async with self._session.post(batch_url(endpoint), data=body, headers=headers) as resp:
                status = resp.status
                reply = await resp.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.debug("report to endpoint failed: %s", type(exc).__name__)
            return "error"
        if 200 <= status < 300:
            self._takes_traces[endpoint] = accepts_field(reply, "traces")
            self._takes_epoch[endpoint] = accepts_field(reply, "epoch")
            self._takes_columnar[endpoint] = accepts_field(reply, "columnar")
        if status == 409:
            return await self._replay_answer(endpoint, batch, reply)
        if 200 <= status < 300:
            if self.on_reprobe is not None:
                asks = reprobe_requests(reply)
                try:
                    if asks:
                        self.on_reprobe(asks)
                except Exception:  # the batch is delivered whatever the scheduler made of it
                    log.exception("re-probe requests not applied")
            return "ok"
        text = reply[:200].decode(errors="replace")
        if status in _PERMANENT:
            log.error("mesh rejected batch %d (%d observations) with %d: %s; dropped",
                      batch.batch_seq, len(batch.bodies), status, text)
            return "rejected"
        log.warning("mesh answered %d to batch %d: %s; will retry", status, batch.batch_seq,
                    text)
        return "error"

    async def _replay_answer(self, endpoint: str, batch: Batch, reply: bytes) -> str:
        """A 409 ``replay``: "duplicate" when the mesh committed this batch earlier, "refused"
        (after starting a new epoch above the mesh's) when it holds a newer epoch of this
        agent. A mesh from before epochs names no position: its 409 means committed earlier."""
        answer = _reply_object(reply)
        epoch, last = answer.get("epoch"), answer.get("batch_seq")
        if not isinstance(epoch, int) or not isinstance(last, int):
            return "duplicate"
        self._takes_epoch[endpoint] = True
        if epoch == batch.epoch and batch.batch_seq <= last:
            return "duplicate"
        assert self._spool is not None
        mine = await self._db(self._spool.new_epoch, epoch)
        log.warning("mesh refused batch %d of epoch %d (%d observations): it holds epoch %d of "
                    "agent %s (the clock went back across a lost state directory, or another "
                    "instance runs under this name); kept, sent again in epoch %d",
                    batch.batch_seq, batch.epoch, len(batch.bodies), epoch, self.agent, mine)
        return "refused"


def _objects_of(batch: Batch, records: list[tuple[int, bytes]],
                objects: list[Observation]) -> list[Observation] | None:
    """The batch's observations when it is the head of the records just committed (the same
    seqs in the same order), else None (it was read from the spool)."""
    n = len(batch.bodies)
    if (0 < n <= len(records) and records[0][0] == batch.first_seq
            and records[n - 1][0] == batch.last_seq):
        return objects[:n]
    return None
