"""`EngineLoop`: an `Engine` stepping on a thread of its own, driven from other threads.

The engine is single-threaded by design. A replica's actor answers calls (new requests,
cancellations, session operations, statistics) on its event loop while the engine steps, so every
call becomes a command: a function of the engine queued here and run on the engine's thread
between two steps, its result handed back through a `concurrent.futures.Future`. A step never
waits for a call, and a call waits at most for the step in progress.

Each request's events go to the listener given with it, as one list a step (called on the engine's
thread: a listener hands the list over to its own thread, e.g. with `call_soon_threadsafe`). The
last list of a request holds its finish reason. If a step raises, which is a bug, every running
request's listener gets `EngineFailure` and the loop stops taking work.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from statemesh.worker.engine.engine import Checkpoint, Engine, Request, TokenEvent

T = TypeVar("T")
Listener = Callable[[list[TokenEvent]], None]
IDLE_WAIT_S = 0.5  # how long an idle loop sleeps between looks at its stop flag


@dataclass(frozen=True)
class EngineFailure:
    """What a listener gets when a step failed: the request is over, with this message."""

    message: str


@dataclass(frozen=True)
class Detached:
    """What a listener gets when its request left this engine (`detach`): no more events here."""


Event = list[TokenEvent] | EngineFailure | Detached | Checkpoint


class EngineLoop:
    def __init__(self, engine: Engine, name: str = "engine"):
        self.engine = engine
        self._commands: queue.SimpleQueue[tuple[Callable[[Engine], Any], Future[Any]]] = queue.SimpleQueue()
        self._listeners: dict[str, Callable[[Event], None]] = {}
        self._stopping = threading.Event()
        self.failure: str | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ---- what other threads call ----------------------------------------------------------------

    def call(self, fn: Callable[[Engine], T]) -> Future[T]:
        """Run `fn(engine)` on the engine's thread between steps; its result (or exception) comes
        back through the future."""
        future: Future[T] = Future()
        if self.failure is not None:
            future.set_exception(RuntimeError(f"this engine stopped after a failed step: {self.failure}"))
            return future
        self._commands.put((fn, future))
        return future

    def submit(
        self, make: Callable[[Engine], Request], listener: Callable[[Event], None], replay: tuple[int, ...] = ()
    ) -> Future[Request]:
        """Queue the request `make(engine)` builds on the engine's thread (so it can read the
        engine's state, e.g. a session's history, with nothing changing in between); its events
        go to `listener`. The future gives the request, or raises what `make` or `Engine.add`
        raise (nothing queued then)."""

        def add(engine: Engine) -> Request:
            request = make(engine)
            engine.add(request, replay)
            self._listeners[request.id] = listener
            return request

        return self.call(add)

    def detach(
        self, request_id: str, after: int | None = None, epoch: int | None = None, park: bool = False
    ) -> Future[bytes]:
        """Take a request out between two steps (`Engine.detach`); its listener gets `Detached`."""

        def detach(engine: Engine) -> bytes:
            state = engine.detach(request_id, after, epoch, park)
            listener = self._listeners.pop(request_id, None)
            if listener is not None:
                listener(Detached())
            return state

        return self.call(detach)

    def attach(self, state: bytes, listener: Callable[[Event], None], migration_id: str | None = None) -> Future[str]:
        """Continue a detached request here (`Engine.attach`); its events go to `listener`."""

        def attach(engine: Engine) -> str:
            request_id = engine.attach(state, migration_id)
            self._listeners[request_id] = listener
            return request_id

        return self.call(attach)

    def recover(
        self, chain: list[bytes], replay: tuple[int, ...], recovery_id: str, listener: Callable[[Event], None]
    ) -> Future[str]:
        """Continue a request from its recovery checkpoints (`Engine.recover`); events to `listener`."""

        def recover(engine: Engine) -> str:
            request_id = engine.recover(chain, replay, recovery_id)
            self._listeners[request_id] = listener
            return request_id

        return self.call(recover)

    def reattach(self, request_id: str, listener: Callable[[Event], None]) -> Future[None]:
        """A parked request goes on here (`Engine.reattach`); its events go to `listener`."""

        def reattach(engine: Engine) -> None:
            engine.reattach(request_id)
            self._listeners[request_id] = listener

        return self.call(reattach)

    def cancel(self, request_id: str) -> Future[bool]:
        """End a request now; its listener gets the `cancelled` event. False if it is not running."""

        def cancel(engine: Engine) -> bool:
            events = engine.cancel(request_id)
            self._deliver(events)
            return bool(events)

        return self.call(cancel)

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._commands.put((lambda engine: None, Future()))  # wake it
        self._thread.join(timeout)

    # ---- the engine's thread --------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._apply_commands(block=not self.engine.has_work())
            if self._stopping.is_set() or not self.engine.has_work():
                continue
            try:
                events = self.engine.step()
            except Exception as e:  # a bug: end every request with a message rather than hang them
                self._fail(f"{type(e).__name__}: {e}")
                return
            self._deliver(events)
            self._deliver_checkpoints()

    def _apply_commands(self, block: bool) -> None:
        try:
            fn, future = self._commands.get(timeout=IDLE_WAIT_S) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(self.engine))
                except Exception as e:
                    future.set_exception(e)
            try:
                fn, future = self._commands.get_nowait()
            except queue.Empty:
                return

    def _deliver(self, events: list[TokenEvent]) -> None:
        by_request: dict[str, list[TokenEvent]] = {}
        for e in events:
            by_request.setdefault(e.request_id, []).append(e)
        for request_id, batch in by_request.items():
            listener = self._listeners.get(request_id)
            if batch[-1].finish_reason is not None:
                self._listeners.pop(request_id, None)
            if listener is not None:
                listener(batch)

    def _deliver_checkpoints(self) -> None:
        """Each recovery checkpoint the step took goes to its request's listener, after its tokens."""
        for checkpoint in self.engine.checkpoints:
            listener = self._listeners.get(checkpoint.request_id)
            if listener is not None:
                listener(checkpoint)
        self.engine.checkpoints.clear()

    def _fail(self, message: str) -> None:
        self.failure = message
        for listener in self._listeners.values():
            listener(EngineFailure(message))
        self._listeners.clear()
        while True:
            try:
                _, future = self._commands.get_nowait()
            except queue.Empty:
                return
            future.set_exception(RuntimeError(f"this engine stopped after a failed step: {message}"))
