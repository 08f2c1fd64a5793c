"""The models a server serves: named at start-up, or loaded on first use, kept in an LRU.

A model is asked for by whatever `--model` takes (a size alias, a repo id, `repo@revision`, a local
directory). Names are matched by what they resolve to, so `1b-instruct` and
`allenai/OLMo-2-0425-1B-Instruct` are one model, and two revisions of a repo are two. Local directories
are served only when the operator named them at start-up; with `allow_load`, Hub models load on first
use. At most `max_models` stay loaded; the least recently used idle one is unloaded to make room.

A directory is served under the name the operator gave (`./tiny`), or its folder's name where that name is absolute:
no response shows where the server keeps its checkpoints. A name a client sends is shown shortened (`shown`) in
every message and log line. The registry records why a named model failed to load (`failures`), for /health.
"""

from __future__ import annotations

import asyncio
import difflib
import gc
import logging
import reprlib
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from olmo2kit.errors import Olmo2KitError, first_line
from olmo2kit.inference.batching import BatchScheduler
from olmo2kit.inference.llamacpp_batching import scheduler_for
from olmo2kit.model.loading import ModelRef, resolve_model
from olmo2kit.model.sizes import aliases, context_length

log = logging.getLogger("olmo2kit")

_SHOWN = reprlib.Repr()
_SHOWN.maxstring = 80
MAX_NAME = 255  # longer names are no model's: they are not compared with the served ones


class ModelNotFound(Olmo2KitError):
    """A model the server does not serve: a 404."""


class ModelsBusy(Olmo2KitError):
    """Every loaded model is busy and none may be unloaded to make room: a 503."""


class ModelUnavailable(Olmo2KitError):
    """A model the operator named failed to load (its first line in the message): a 503."""


def shown(name: str) -> str:
    """A name a client sent, as messages and logs show it: quoted, and cut in the middle past 80 characters.

    >>> shown("a" * 300)
    "'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa...aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa'"
    """
    return _SHOWN.repr(name)


@dataclass
class ServedModel:
    name: str  # as the operator or the first client named it
    model: object
    tokenizer: object
    scheduler: BatchScheduler
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


@dataclass(frozen=True)
class _Named:
    """A model named at start-up: the name it is served under, the name it was given (and loads by), and the
    paths of this machine its errors may show, each with the name that replaces it."""

    served: str
    given: str
    hidden: dict[str, str]


def _named(names: list[str]) -> dict[str, _Named]:
    """key -> _Named for the names given at start-up. A directory named by an absolute path is served under its
    folder's name (with as many parent folders as tell two apart): no response shows where the server keeps it."""
    refs: dict[str, tuple[str, ModelRef]] = {}
    for name in names:
        ref = resolve_model(name)  # a name that resolves to nothing fails here
        refs.setdefault(_key(ref), (name, ref))
    hide = {key for key, (name, ref) in refs.items() if ref.local and Path(name).is_absolute()}
    taken = {name for key, (name, _) in refs.items() if key not in hide}
    named = {}
    for key, (name, ref) in refs.items():
        served = name
        if key in hide:
            parts = Path(key).parts
            served = next(tail for tail in ("/".join(parts[-n:]) for n in range(1, len(parts) + 1))
                          if tail not in taken)
            taken.add(served)
        paths = {path for path in (key, ref.source) if ref.local and Path(path).is_absolute()}
        named[key] = _Named(served, name, {path: served for path in sorted(paths, key=len, reverse=True)})
    return named


def served_names(names: list[str]) -> list[str]:
    """The names a server serves `names` (as given at start-up) under, in their order, one for each model."""
    return [named.served for named in _named(names).values()]


def _one_line(error: BaseException, hidden: dict[str, str] | None = None) -> str:
    """The first line of `error`, each of `hidden`'s strings (a checkpoint's path) replaced by its value, cut in
    the middle past 300 characters."""
    line = first_line(error)
    for secret, public in (hidden or {}).items():
        line = line.replace(secret, public)
    return line if len(line) <= 300 else f"{line[:148]}...{line[-149:]}"


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
        self._named = _named(names)
        self.named: dict[str, str] = {key: named.served for key, named in self._named.items()}  # key -> its name
        self.loaded: OrderedDict[str, ServedModel] = OrderedDict()  # key -> model, least recently used first
        self.failed: dict[str, str] = {}  # key of a named model -> why its last load failed (one line)
        self._locks: dict[str, asyncio.Lock] = {}

    def add(self, name: str, model, tokenizer) -> ServedModel:
        """Serve an already loaded model under `name`: any name, when it resolves to no model."""
        key = self._served_key(name) or _key_of(name) or name
        served = ServedModel(name, model, tokenizer, scheduler_for(
            model, tokenizer, max_batch_size=self.max_batch_size, max_queue=self.max_queue))
        self.loaded[key] = served
        return served

    def load_named(self) -> None:
        """Load every model named at start-up that is not loaded yet; the first failure is raised (and recorded)."""
        for key, name in self.named.items():
            if key not in self.loaded:
                self.add(name, *self._load_named(key))

    def failures(self) -> dict[str, str]:
        """Name -> why it failed to load (one line), for each named model whose last load failed."""
        return {self.named[key]: reason for key, reason in self.failed.items()}

    def _load_named(self, key: str) -> tuple:
        """Load the named model `key` by the name the operator gave, recording the outcome for `failures`."""
        try:
            loaded = self._load(self._named[key].given)
        except Exception as e:
            self.failed[key] = _one_line(e, self._named[key].hidden)
            log.error("model %s failed to load: %s", self.named[key], self.failed[key])
            raise
        self.failed.pop(key, None)
        return loaded

    def names(self) -> list[ServedModel | str]:
        """The models served: loaded ones, then named ones not loaded yet."""
        return list(self.loaded.values()) + [n for k, n in self.named.items() if k not in self.loaded]

    def served(self) -> list[str]:
        """The names the models are served under, as `names` orders them."""
        return [s.name if isinstance(s, ServedModel) else s for s in self.names()]

    async def get(self, name: str) -> ServedModel:
        """The model `name` asks for, loading it if it may be; ModelNotFound, ModelsBusy, or ModelUnavailable
        (a named model that fails to load) otherwise."""
        key = self._resolve_key(name)
        if key in self.loaded:
            self.loaded.move_to_end(key)
            return self.loaded[key]
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            if key not in self.loaded:
                self._make_room()
                if key in self.named:
                    try:
                        model, tokenizer = await asyncio.to_thread(self._load_named, key)
                    except Olmo2KitError:
                        raise ModelUnavailable(f"model {self.named[key]!r} failed to load "
                                               f"({self.failed[key]}): the server log has the details") from None
                else:
                    try:
                        model, tokenizer = await asyncio.to_thread(self._load, name)
                    except Olmo2KitError as e:
                        raise ModelNotFound(_one_line(e)) from None
                try:  # its scheduler: on llama.cpp a context is made here, which can be refused
                    self.add(self.named.get(key, name), model, tokenizer)
                except Olmo2KitError as e:
                    if key in self.named:
                        self.failed[key] = _one_line(e)
                        raise ModelUnavailable(f"model {self.named[key]!r} failed to load ({self.failed[key]}): "
                                               "the server log has the details") from None
                    raise ModelNotFound(_one_line(e)) from None
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
        if len(name) > MAX_NAME:
            raise ModelNotFound(self._not_served(name))
        key = self._served_key(name) or _key_of(name)
        if key is None:
            raise ModelNotFound(self._not_served(name))
        if key in self.loaded or key in self.named:
            return key
        if not self.allow_load or Path(key).is_absolute():
            raise ModelNotFound(self._not_served(name))
        return key

    def _not_served(self, name: str) -> str:
        """One message whatever `name` is on this machine: a client learns nothing of the server's files."""
        served = self.served()
        pool = served + (list(aliases()) if self.allow_load else [])
        near = difflib.get_close_matches(name, pool, n=3, cutoff=0.5) if len(name) <= MAX_NAME else []
        hint = f"; did you mean {', '.join(near)}?" if near else f"; served: {', '.join(served) or 'none'}"
        what = "only the models named at start-up are served" if not self.allow_load else (
            "only the models named at start-up and Hub models are served")
        return f"model {shown(name)} is not served ({what}){hint}"

    def _make_room(self) -> None:
        """Unload the least recently used idle models until one more fits; ModelsBusy if none can go."""
        while len(self.loaded) >= self.max_models:
            idle = next((k for k, s in self.loaded.items() if not s.scheduler.busy), None)
            if idle is None:
                raise ModelsBusy(f"all {self.max_models} model slots are busy: retry when a request finishes")
            self.loaded.pop(idle).close()
            gc.collect()

