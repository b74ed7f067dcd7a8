"""`ReplicaEvents`: the one stream of events from a replica's engine (`ShardWorker.events`), read
once and handed out to the requests it serves, each through a `Feed`.

A replica sends one item per engine step for all its requests together, not a stream per request:
at 32 streams that is one Ray message a step instead of 32, and a step's tokens reach the
coordinator in one piece. A request opens its feed on a replica before the call that starts it
there (`generate`, `resume`, `recover`, `reattach`), so no event can come before its reader.

A request may have two feeds on one replica in turn (a move that failed: its old feed ends with
`Detached`, then the new one reads what it does after `reattach`). Feeds of one request are served
in the order they opened, each until its end, so the replica's order is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import ray

from statemesh.cluster.errors import Unavailable
from statemesh.worker.engine.engine import Checkpoint, TokenEvent
from statemesh.worker.engine.loop import Detached, EngineFailure, Event


@dataclass(frozen=True)
class Lost:
    """What a feed gets when its replica's stream broke (its worker died, most likely)."""

    message: str


class Feed:
    """One request's events from one replica: an async iterator of lists of `TokenEvent`s and
    `Checkpoint`s. It ends after the list with the finish reason, or without one when the request
    left the replica (`Detached`: it moved); it raises `RuntimeError` when the engine's step failed
    and `Unavailable` when the replica's stream broke."""

    def __init__(self, request_id: str, owner: ReplicaEvents):
        self.request_id = request_id
        self.owner = owner
        self.queue: asyncio.Queue[Event | Lost] = asyncio.Queue()
        self.ended = False

    def __aiter__(self) -> AsyncIterator[list[TokenEvent] | Checkpoint]:
        return self._events()

    async def _events(self) -> AsyncIterator[list[TokenEvent] | Checkpoint]:
        while not self.ended:
            event = await self.queue.get()
            if isinstance(event, Lost):
                self.close()
                raise Unavailable(f"request {self.request_id}'s replica is gone ({event.message})")
            if isinstance(event, EngineFailure):
                self.close()
                raise RuntimeError(f"request {self.request_id} ended by a failed engine step: {event.message}")
            if isinstance(event, Detached):
                self.close()
                return
            if _last(event):  # its finish
                self.close()
            yield event

    def close(self) -> None:
        """Stop reading: what comes for the request later goes to its next feed, or nowhere."""
        self.ended = True
        self.owner.forget(self)


class ReplicaEvents:
    """Reads a replica's event stream in a task of its own and hands each request its events."""

    def __init__(self, engine: Any, name: str):
        self.name = name
        self.feeds: dict[str, list[Feed]] = {}
        self.broken: str | None = None
        stream = engine.events.options(num_returns="streaming").remote()
        self.task = asyncio.get_running_loop().create_task(self._read(stream), name=f"events of {name}")

    def open(self, request_id: str) -> Feed:
        """A feed for what `request_id` does on this replica from the call that follows on."""
        feed = Feed(request_id, self)
        if self.broken is not None:
            feed.queue.put_nowait(Lost(self.broken))
        else:
            self.feeds.setdefault(request_id, []).append(feed)
        return feed

    def forget(self, feed: Feed) -> None:
        feeds = self.feeds.get(feed.request_id)
        if feeds is not None and feed in feeds:
            feeds.remove(feed)
            if not feeds:
                del self.feeds[feed.request_id]

    async def _read(self, stream: Any) -> None:
        try:
            async for ref in stream:
                self._hand_out(await ref)
            message = "its event stream ended"
        except asyncio.CancelledError:
            message = "the coordinator stopped reading it"
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
            message = type(e).__name__
        self.broken = message
        for feeds in list(self.feeds.values()):
            for feed in feeds:
                feed.queue.put_nowait(Lost(message))
        self.feeds.clear()

    def _hand_out(self, item: dict[str, list[Event]]) -> None:
        for request_id, events in item.items():
            for event in events:
                feeds = self.feeds.get(request_id)
                if not feeds:
                    break  # no one reads it (its caller left): the worker was told to cancel it
                feed = feeds[0]
                feed.queue.put_nowait(event)
                if _last(event):  # what follows belongs to the request's next feed here, if any
                    feeds.pop(0)
                    if not feeds:
                        del self.feeds[request_id]

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


def _last(event: Event) -> bool:
    """Whether `event` ends its request's feed."""
    if isinstance(event, list):
        return bool(event) and event[-1].finish_reason is not None
    return isinstance(event, (Detached, EngineFailure))
