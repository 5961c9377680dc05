"""A zarr store wrapper for remote stores: a chunk cache (bounded memory, optional disk folder) and retries.

:class:`ChunkCache` wraps any zarr 3 store (here an ``FsspecStore`` of an address, see
:mod:`vesuvius_monai.data.remote`):

* memory: the values read last, at most ``memory_bytes`` in all (0: none); the least recently used is dropped
  first, among the values no planned read needs any more (:meth:`ChunkCache.expect`) before the others;
* disk (optional): every chunk read is kept as a file ``<disk>/<key>``, written to a temporary file and renamed,
  so a killed run leaves no torn chunk; a later run (a rerun, a resumed run) reads it from there. Metadata
  (``zarr.json``, ``.zarray``, ``.zattrs``, ...) and chunks missing from the store are never kept on disk: they
  are asked for again by every run, so a store that is completed or fixed later is seen;
* one request per key at a time: readers asking for a key being fetched wait for that fetch;
* a dropped connection, a timeout or a 5xx / 429 answer is retried ``retries`` times in all, waiting
  ``backoff_s`` seconds, then twice as long each time; what still fails raises :class:`RemoteError` naming the
  address, the key and the last error. A missing key (404) is no error: zarr reads it as the fill value.

Every store call runs on zarr's event loop (one thread), so the cache needs no lock.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from pathlib import Path

from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype
from zarr.storage import WrapperStore

from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io.atomic import atomic_path

logger = logging.getLogger(__name__)

METADATA_NAMES = ("zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata")
ENTRY_BYTES = 64  # what an entry costs the memory bound besides its value (a missing key costs this alone)
_ABSENT = object()  # "not in the cache" (None means "missing from the store")


class RemoteError(VesuviusError):
    """A request that failed for good (after its retries, or an answer no retry can change)."""


def is_metadata(key: str) -> bool:
    return key.rsplit("/", 1)[-1] in METADATA_NAMES


def range_key(byte_range: ByteRequest | None) -> tuple | None:
    """A hashable form of a zarr byte request (None: the whole value)."""
    if byte_range is None:
        return None
    if isinstance(byte_range, RangeByteRequest):
        return ("range", byte_range.start, byte_range.end)
    if isinstance(byte_range, OffsetByteRequest):
        return ("offset", byte_range.offset)
    if isinstance(byte_range, SuffixByteRequest):
        return ("suffix", byte_range.suffix)
    raise ValueError(f"unexpected byte_range {byte_range!r}")


def retryable(exc: BaseException) -> bool:
    """True for failures a later try may not meet: dropped connections, timeouts, 5xx / 408 / 429 answers."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    try:
        import aiohttp
    except ImportError:  # pragma: no cover - aiohttp is a requirement
        aiohttp = None
    if aiohttp is not None:
        if isinstance(exc, aiohttp.ClientResponseError):
            return exc.status >= 500 or exc.status in (408, 429)
        if isinstance(exc, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)):
            return True
    return isinstance(exc, (TimeoutError, asyncio.TimeoutError, ConnectionError, OSError))


def describe(exc: BaseException) -> str:
    """One short phrase for a failed request."""
    status = getattr(exc, "status", None)
    if isinstance(status, int):
        return f"HTTP {status} {getattr(exc, 'message', '')}".rstrip()
    text = str(exc).strip() or "no message"
    return f"{type(exc).__name__}: {text}"


def _cost(data: bytes | None) -> int:
    return ENTRY_BYTES + (len(data) if data is not None else 0)


class ChunkCache(WrapperStore):
    """``store`` read through a memory + disk cache, with retries (see the module docstring).

    ``address``: for messages; ``memory_bytes``: the memory bound; ``disk``: the cache folder of this store or None;
    ``retries``: tries per request (>= 1); ``backoff_s``: the first wait. ``stats`` counts what reached the store:
    ``requests`` (answered), ``bytes`` (received), ``missing`` (404s), ``retried`` (tries that failed and were
    retried), ``disk_hits``.
    """

    def __init__(self, store, *, address: str, memory_bytes: int, disk: Path | None = None, retries: int = 5,
                 backoff_s: float = 0.5) -> None:
        super().__init__(store)
        self.address, self.memory_bytes, self.disk = address, int(memory_bytes), disk
        self.retries, self.backoff_s = max(1, int(retries)), float(backoff_s)
        self._memory: dict[tuple, bytes | None] = {}
        self._order: dict[bool, OrderedDict[tuple, None]] = {False: OrderedDict(), True: OrderedDict()}  # planned?
        self._uses: dict[str, int] = {}  # planned reads left, per key (see expect)
        self._held = 0
        self._inflight: dict[tuple, asyncio.Future] = {}
        self.stats = {"requests": 0, "bytes": 0, "missing": 0, "retried": 0, "disk_hits": 0}

    def _with_store(self, store) -> ChunkCache:
        return type(self)(store, address=self.address, memory_bytes=self.memory_bytes, disk=self.disk,
                          retries=self.retries, backoff_s=self.backoff_s)

    def __repr__(self) -> str:
        return f"ChunkCache({self.address!r})"

    # ------------------------------------------------------------------------------------------- reading

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None) -> Buffer | None:
        entry = (key, range_key(byte_range))
        self._consume(entry)
        data = self._recall(entry)
        if data is _ABSENT:
            pending = self._inflight.get(entry)
            if pending is None:
                pending = asyncio.ensure_future(self._fetch(key, byte_range, entry))
                self._inflight[entry] = pending
                pending.add_done_callback(lambda _: self._inflight.pop(entry, None))
            data = await asyncio.shield(pending)
        return None if data is None else prototype.buffer.from_bytes(data)

    async def get_partial_values(self, prototype: BufferPrototype, key_ranges) -> list[Buffer | None]:
        return list(await asyncio.gather(*(self.get(k, prototype, r) for k, r in key_ranges)))

    async def exists(self, key: str) -> bool:
        data = self._recall((key, None))
        if data is not _ABSENT:
            return data is not None
        return bool(await self._retrying(key, lambda: self._store.exists(key)))

    # ------------------------------------------------------------------------------------------- the cache

    def expect(self, keys) -> None:
        """Plan: ``keys`` (one per planned read of a chunk, repeats counted) will be read. A value with planned reads
        left is dropped from memory only when no value without one is left to drop."""
        for key in keys:
            self._uses[key] = self._uses.get(key, 0) + 1

    def _consume(self, entry: tuple) -> None:
        """One planned read of ``entry`` happened."""
        left = self._uses.get(entry[0], 0) - 1 if entry[1] is None else 0
        if left > 0:
            self._uses[entry[0]] = left
        else:
            self._uses.pop(entry[0], None)

    def _recall(self, entry: tuple) -> bytes | None | object:
        """The cached value of ``entry`` (None: missing from the store), or ``_ABSENT``."""
        if entry in self._memory:
            self._touch(entry)
            return self._memory[entry]
        file = self._disk_file(entry)
        if file is not None and file.is_file():
            data = file.read_bytes()
            self.stats["disk_hits"] += 1
            self._remember(entry, data)
            return data
        return _ABSENT

    def _touch(self, entry: tuple) -> None:
        """Move ``entry`` to the recent end of its order (planned reads left or not)."""
        for order in self._order.values():
            order.pop(entry, None)
        self._order[entry[1] is None and entry[0] in self._uses][entry] = None

    def _remember(self, entry: tuple, data: bytes | None) -> None:
        cost = ENTRY_BYTES + (len(data) if data is not None else 0)
        if cost > self.memory_bytes:
            return
        if entry in self._memory:
            self._held -= _cost(self._memory[entry])
        self._memory[entry] = data
        self._touch(entry)
        self._held += cost
        while self._held > self.memory_bytes:
            order = self._order[False] or self._order[True]
            dropped, _ = order.popitem(last=False)
            self._held -= _cost(self._memory.pop(dropped))

    def _disk_file(self, entry: tuple) -> Path | None:
        """Where ``entry`` is kept on disk, or None (no disk cache, metadata, a byte range, an odd key)."""
        key, byte_range = entry
        if self.disk is None or byte_range is not None or is_metadata(key):
            return None
        parts = key.split("/")
        if any(p in ("", ".", "..") for p in parts):
            return None
        return self.disk.joinpath(*parts)

    async def _fetch(self, key: str, byte_range: ByteRequest | None, entry: tuple) -> bytes | None:
        buffer = await self._retrying(key, lambda: self._store.get(key, default_buffer_prototype(), byte_range))
        self.stats["requests"] += 1
        data = None if buffer is None else buffer.to_bytes()
        if data is None:
            self.stats["missing"] += 1
        else:
            self.stats["bytes"] += len(data)
            file = self._disk_file(entry)
            if file is not None:
                with atomic_path(file, suffix="") as tmp:
                    tmp.write_bytes(data)
        self._remember(entry, data)
        return data

    async def _retrying(self, key: str, call):
        """``await call()``, retried as the module docstring says; RemoteError naming the address and ``key``."""
        for attempt in range(self.retries):
            try:
                return await call()
            except Exception as exc:
                if not retryable(exc):
                    raise RemoteError(f"{self.address}: reading {key} failed ({describe(exc)})") from exc
                if attempt + 1 == self.retries:
                    raise RemoteError(f"{self.address}: reading {key} failed {self.retries} times, last with "
                                      f"{describe(exc)}; is the server down? Run the same command again when it is "
                                      f"back (a .zarr prediction keeps its finished blocks)") from exc
                wait = self.backoff_s * 2**attempt
                self.stats["retried"] += 1
                logger.warning("%s: reading %s failed (%s); try %d of %d in %.1f s", self.address, key, describe(exc),
                               attempt + 2, self.retries, wait)
                await asyncio.sleep(wait)
        raise AssertionError("unreachable")
