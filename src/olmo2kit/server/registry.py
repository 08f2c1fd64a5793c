"""The models a server serves: named at start-up, or loaded on first use, kept in an LRU.

A model is asked for by whatever `--model` takes (a size alias, a repo id, `repo@revision`, a local
directory). Names are matched by what they resolve to, so `1b-instruct` and
`allenai/OLMo-2-0425-1B-Instruct` are one model, and two revisions of a repo are two. Local directories
are served only when the operator named them at start-up; with `allow_load`, Hub models load on first
use. At most `max_models` stay loaded; the least recently used idle one is unloaded to make room.
"""

from __future__ import annotations

import asyncio
import difflib
import gc
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from olmo2kit.errors import Olmo2KitError
from olmo2kit.inference.batching import BatchScheduler, SerialScheduler, scheduler_for
from olmo2kit.model.loading import ModelRef, resolve_model
from olmo2kit.model.sizes import aliases, context_length


class ModelNotFound(Olmo2KitError):
    """A model the server does not serve: a 404."""


class ModelsBusy(Olmo2KitError):
    """Every loaded model is busy and none may be unloaded to make room: a 503."""


@dataclass
class ServedModel:
    name: str  # as the operator or the first client named it
    model: object
    tokenizer: object
    scheduler: BatchScheduler | SerialScheduler
    created: int = field(default_factory=lambda: int(time.time()))
    _inbox: Inbox | None = field(default=None, repr=False)

    @property
    def context_length(self) -> int | None:
        return context_length(self.model.config)

    def close(self) -> None:
        self.scheduler.close()

    def inbox(self) -> Inbox:
        """The scheduler-to-event-loop hand-over of the running loop (made on first use)."""
        loop = asyncio.get_running_loop()
        if self._inbox is None or self._inbox.loop is not loop:
            self._inbox = Inbox(loop)
        return self._inbox


class Inbox:
    """Events from the scheduler's thread to asyncio queues on the event loop, with one wake-up of the loop for
    whatever arrived meanwhile (a step of 16 rows is one wake-up, not 16)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._items: deque = deque()
        self._lock = threading.Lock()
        self._scheduled = False

    def put(self, queue: asyncio.Queue, item) -> None:
        """Called from any thread."""
        with self._lock:
            self._items.append((queue, item))
            if self._scheduled:
                return
            self._scheduled = True
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            items, self._items = self._items, deque()
            self._scheduled = False
        for queue, item in items:
            queue.put_nowait(item)


def _key(ref: ModelRef) -> str:
    return str(Path(ref.source).resolve()) if ref.local else str(ref)


def _key_of(name: str) -> str | None:
    """The key of what `name` resolves to (a Hub repo at a revision, or a directory); None if nothing."""
    try:
        return _key(resolve_model(name))
    except Olmo2KitError:
        return None


class ModelRegistry:
    """Name -> ServedModel, loading through `load(name) -> (model, tokenizer)` (olmo2kit.load with the
    server's dtype, quantization and device)."""

    def __init__(self, names: list[str], load: Callable[[str], tuple], *, max_models: int | None = None,
                 allow_load: bool = False, max_batch_size: int = 16, max_queue: int = 256) -> None:
        self.max_models = max_models if max_models is not None else max(1, len(names))
        if self.max_models < 1:
            raise Olmo2KitError(f"max_models must be at least 1, got {self.max_models}")
        if len(names) > self.max_models:
            raise Olmo2KitError(f"{len(names)} models named but max_models is {self.max_models}: raise max_models")
        self._load = load
        self.allow_load = allow_load
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.named: dict[str, str] = {}  # key -> name given at start-up
        for name in names:
            self.named.setdefault(_key(resolve_model(name)), name)  # a name that resolves to nothing fails here
        self.loaded: OrderedDict[str, ServedModel] = OrderedDict()  # key -> model, least recently used first
        self._locks: dict[str, asyncio.Lock] = {}

    def add(self, name: str, model, tokenizer) -> ServedModel:
        """Serve an already loaded model under `name`: any name, when it resolves to no model."""
        key = self._served_key(name) or _key_of(name) or name
        served = ServedModel(name, model, tokenizer, scheduler_for(
            model, tokenizer, max_batch_size=self.max_batch_size, max_queue=self.max_queue))
        self.loaded[key] = served
        return served

    def load_named(self) -> None:
        """Load every model named at start-up that is not loaded yet."""
        for key, name in self.named.items():
            if key not in self.loaded:
                self.add(name, *self._load(name))

    def names(self) -> list[ServedModel | str]:
        """The models served: loaded ones, then named ones not loaded yet."""
        return list(self.loaded.values()) + [n for k, n in self.named.items() if k not in self.loaded]

    async def get(self, name: str) -> ServedModel:
        """The model `name` asks for, loading it if it may be; ModelNotFound or ModelsBusy otherwise."""
        key = self._resolve_key(name)
        if key in self.loaded:
            self.loaded.move_to_end(key)
            return self.loaded[key]
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            if key not in self.loaded:
                self._make_room()
                try:
                    model, tokenizer = await asyncio.to_thread(self._load, name)
                except Olmo2KitError as e:
                    raise ModelNotFound(str(e)) from None
                self.add(self.named.get(key, name), model, tokenizer)
        self.loaded.move_to_end(key)
        return self.loaded[key]

    def close(self) -> None:
        for served in self.loaded.values():
            served.close()
        self.loaded.clear()

    def stop(self) -> None:
        """End every request still waiting or running (each gets an error), from any thread; for shutdown."""
        for served in list(self.loaded.values()):
            served.close()

    def _served_key(self, name: str) -> str | None:
        """The key of a model served under exactly this name."""
        for key, served in self.loaded.items():
            if served.name == name:
                return key
        return next((key for key, named in self.named.items() if named == name), None)

    def _resolve_key(self, name: str) -> str:
        """The key `name` is served or may be loaded under; ModelNotFound if neither."""
        key = self._served_key(name) or _key_of(name)
        if key is None:
            raise ModelNotFound(self._not_served(name))
        if key in self.loaded or key in self.named:
            return key
        if not self.allow_load or Path(key).is_absolute():
            raise ModelNotFound(self._not_served(name))
        return key

    def _not_served(self, name: str) -> str:
        served = [s.name if isinstance(s, ServedModel) else s for s in self.names()]
        pool = served + (list(aliases()) if self.allow_load else [])
        near = difflib.get_close_matches(name, pool, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(near)}?" if near else f"; served: {', '.join(served) or 'none'}"
        what = "only the models named at start-up are served" if not self.allow_load else (
            "local directories are served only when named at start-up" if _looks_local(name) else "it is unknown")
        return f"model {name!r} is not served ({what}){hint}"

    def _make_room(self) -> None:
        """Unload the least recently used idle models until one more fits; ModelsBusy if none can go."""
        while len(self.loaded) >= self.max_models:
            idle = next((k for k, s in self.loaded.items() if not s.scheduler.busy), None)
            if idle is None:
                raise ModelsBusy(f"all {self.max_models} model slots are busy: retry when a request finishes")
            self.loaded.pop(idle).close()
            gc.collect()


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists()
