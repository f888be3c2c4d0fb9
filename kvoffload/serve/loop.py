"""The server's one engine loop: a thread that owns the engine and steps it.

Every call into the engine (add, abort, step, pop) happens on this thread. HTTP handlers
(asyncio) hand it commands through a thread-safe inbox and read their own request's events
from an ``asyncio.Queue`` the loop feeds with ``call_soon_threadsafe``. A request joins the
running batch at the next step the scheduler admits it (continuous batching) and leaves when it
finishes, is cancelled (client gone: its KV is freed before the next step) or times out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from kvoffload.config import SamplingParams
from kvoffload.engine.engine import Engine, StepOutput
from kvoffload.engine.sequence import Sequence
from kvoffload.errors import KvoffloadError

log = logging.getLogger("kvoffload.serve")

_KV_SNAPSHOT_S = 0.25        # how often the loop copies the KV store's counters for /metrics


@dataclass(frozen=True)
class Event:
    """What a request's queue receives: ``token`` (one per generated token), then ``done``
    (the finished :class:`Sequence`) or ``error`` (``status``, one-line ``message``)."""

    kind: str
    out: StepOutput | None = None
    seq: Sequence | None = None
    status: int = 0
    message: str = ""


class Handle:
    """One engine request as a handler sees it: its events go to ``events`` as ``(index, Event)``
    (one queue may serve several handles: the choices of one HTTP request)."""

    def __init__(self, aloop: asyncio.AbstractEventLoop, events: asyncio.Queue, index: int, arrival: float,
                 deadline: float) -> None:
        self.events, self.index = events, index
        self.aloop, self.arrival, self.deadline = aloop, arrival, deadline
        self.seq_id: int | None = None
        self.first_token: float | None = None
        self.closed = False          # done, failed or aborted: counted out of the pending total

    def _put(self, ev: Event) -> None:
        try:
            self.aloop.call_soon_threadsafe(self.events.put_nowait, (self.index, ev))
        except RuntimeError:         # the handler's event loop is gone (server stopping)
            pass


class EngineLoop:
    """Steps one :class:`Engine`; at most ``max_pending`` requests running or queued."""

    def __init__(self, engine: Engine, max_pending: int, metrics=None) -> None:
        self.engine, self.max_pending, self.metrics = engine, max_pending, metrics
        self._pending = 0
        self._lock = threading.Lock()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._handles: dict[int, Handle] = {}
        self._stop = threading.Event()
        self._running = threading.Event()       # cleared while paused()
        self._running.set()
        self._last_snapshot = 0.0
        self.thread = threading.Thread(target=self._run, name="kvoffload-engine", daemon=True)

    # ------------------------------------------------------------ from handlers (any thread)
    def start(self) -> None:
        """Start stepping the engine; it must not be stepped by another loop (each would take
        the other's outputs and race it through the scheduler)."""
        if self.engine.driver is not None:
            raise KvoffloadError("this LLM is already being served (one server per LLM): stop that server first")
        self.engine.driver = self
        self.thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._running.set()
        self._inbox.put(("wake",))
        if self.thread.is_alive():
            self.thread.join(timeout)
        if self.engine.driver is self and not self.thread.is_alive():
            self.engine.driver = None

    @property
    def pending(self) -> int:
        return self._pending

    def reserve(self, n: int) -> bool:
        """Count ``n`` new requests in, unless that passes ``max_pending`` (then nothing is counted)."""
        with self._lock:
            if self._pending + n > self.max_pending:
                return False
            self._pending += n
            return True

    def release(self, n: int) -> None:
        """Give back reservations that were never submitted."""
        with self._lock:
            self._pending -= n

    def submit(self, prompt_ids: list[int], params: SamplingParams, arrival: float, timeout: float,
               events: asyncio.Queue, index: int = 0) -> Handle:
        """A reserved request into the engine (from a coroutine: its events go to this event loop)."""
        h = Handle(asyncio.get_running_loop(), events, index, arrival, arrival + timeout)
        self._inbox.put(("add", h, prompt_ids, params))
        return h

    def cancel(self, h: Handle) -> None:
        """Abort the request (client gone); its KV is freed before the next step. Idempotent."""
        self._inbox.put(("abort", h))

    async def call(self, fn: Callable[[Engine], Any]) -> Any:
        """``fn(engine)`` on the loop's thread, between steps."""
        fut = asyncio.get_running_loop().create_future()
        self._inbox.put(("call", fn, fut))
        return await fut

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No steps while inside (requests queue up): for tests of the queue bounds."""
        self._running.clear()
        try:
            yield
        finally:
            self._running.set()

    # ------------------------------------------------------------ the thread
    def _run(self) -> None:
        while not self._stop.is_set():
            busy = self.engine.has_unfinished()
            self._drain(block=not busy)
            self._running.wait()
            if self._stop.is_set():
                break
            self._expire()
            if not self.engine.has_unfinished():
                self._gauges()
                continue
            try:
                outs = self.engine.step()
            except KvoffloadError as e:
                self._fail_all(500, str(e))
                continue
            except Exception:                         # a bug: the log gets the traceback, clients one line
                log.exception("engine step failed")
                self._fail_all(500, "internal error in the engine step (see the server log)")
                continue
            now = time.perf_counter()
            for o in outs:
                self._deliver(o, now)
            self._gauges()
        self._fail_all(503, "the server is shutting down")

    def _drain(self, block: bool) -> None:
        try:
            cmd = self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._command(cmd)
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _command(self, cmd: tuple) -> None:
        kind = cmd[0]
        if kind == "add":
            _, h, prompt_ids, params = cmd
            try:
                h.seq_id = self.engine.add_request(prompt_ids, params)
            except KvoffloadError as e:
                self._close(h, Event("error", status=400, message=str(e)), "error")
                return
            self._handles[h.seq_id] = h
        elif kind == "abort":
            h = cmd[1]
            if not h.closed and h.seq_id is not None:
                self.engine.abort([h.seq_id])
                self._handles.pop(h.seq_id, None)
                self._close(h, None, "abort")
        elif kind == "call":
            _, fn, fut = cmd
            try:
                result = fn(self.engine)
            except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
                fut.get_loop().call_soon_threadsafe(_set_exception, fut, e)
            else:
                fut.get_loop().call_soon_threadsafe(_set_result, fut, result)

    def _deliver(self, o: StepOutput, now: float) -> None:
        h = self._handles.get(o.seq_id)
        if h is None:
            return
        m = self.metrics
        if h.first_token is None:
            h.first_token = now
            if m is not None:
                m.ttft.observe(now - h.arrival)
        if m is not None:
            m.generation_tokens.inc()
        h._put(Event("token", out=o))
        if o.finished:
            seq = self.engine.pop_finished(o.seq_id)
            del self._handles[o.seq_id]
            if m is not None:
                m.prompt_tokens.inc(seq.prompt_len)
                m.e2e.observe(now - h.arrival)
                if len(seq.output_ids) > 1:
                    m.tpot.observe((now - h.first_token) / (len(seq.output_ids) - 1))
            self._close(h, Event("done", seq=seq), seq.finish_reason or "stop")

    def _close(self, h: Handle, ev: Event | None, reason: str) -> None:
        if h.closed:
            return
        h.closed = True
        with self._lock:
            self._pending -= 1
        if self.metrics is not None:
            self.metrics.requests.labels(reason).inc()
        if ev is not None:
            h._put(ev)

    def _expire(self) -> None:
        now = time.perf_counter()
        late = [h for h in self._handles.values() if now > h.deadline]
        for h in late:
            self.engine.abort([h.seq_id])
            del self._handles[h.seq_id]
            self._close(h, Event("error", status=504, message=f"the request took more than "
                                 f"{h.deadline - h.arrival:g} s (--request-timeout) and was cancelled"), "timeout")

    def _fail_all(self, status: int, message: str) -> None:
        handles, self._handles = list(self._handles.values()), {}
        self.engine.abort([h.seq_id for h in handles])
        for h in handles:
            self._close(h, Event("error", status=status, message=message), "error")

    def _gauges(self) -> None:
        m = self.metrics
        if m is None:
            return
        m.waiting.set(len(self.engine.scheduler.waiting))
        m.running.set(len(self.engine.scheduler.running))
        m.kv_reserved.set(self.engine.scheduler.kv_reserved)
        now = time.perf_counter()
        if now - self._last_snapshot >= _KV_SNAPSHOT_S or not self._handles:
            self._last_snapshot = now
            try:
                spec = self.engine.spec
                used = {t.name: t.used for t in getattr(self.engine.kv, "tiers", ())}    # the tiered store's
                m.snapshot_kv(self.engine.kv.stats(), used, spec.stats if spec is not None else None)
            except Exception:
                log.exception("KV statistics failed")


def _set_result(fut: asyncio.Future, value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
