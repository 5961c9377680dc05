"""Volumes at ``http://``, ``https://`` and ``s3://`` addresses: Zarr / OME-Zarr stores read through zarr 3's own
:class:`zarr.storage.FsspecStore` (fsspec + aiohttp; ``s3://`` through s3fs when it is installed), wrapped in a
:class:`~vesuvius_monai.data.chunk_cache.ChunkCache` (bounded memory, optional disk folder, retries with backoff).

An address stays a string (:class:`RemoteAddress`): ``Path`` would turn ``http://host/a.zarr`` into
``http:/host/a.zarr``. :func:`as_location` is the one place where a command-line or YAML value becomes a ``Path``
(local) or a :class:`RemoteAddress`.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from vesuvius_monai.errors import VesuviusError

SCHEMES = ("http://", "https://", "s3://")


def is_remote(value: object) -> bool:
    """True for a string that starts with one of :data:`SCHEMES` (case-insensitive)."""
    return isinstance(value, str) and value.lower().startswith(SCHEMES)


class RemoteAddress(str):
    """An address of a remote volume, answering the few ``Path`` questions asked of a volume's location (``name``,
    ``suffix``, ``resolve()``) without mangling it. The address itself is the string."""

    @property
    def name(self) -> str:
        """The last component of the address's path (``.../scroll1.zarr/`` -> ``scroll1.zarr``)."""
        return urlsplit(str(self)).path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        return os.path.splitext(self.name)[1]

    def resolve(self) -> RemoteAddress:
        return self

    def exists(self) -> bool:  # known only once it is opened; see open_remote_store
        return True

    def is_dir(self) -> bool:
        return False

    def is_file(self) -> bool:
        return False


def as_location(value: str | os.PathLike) -> Path | RemoteAddress:
    """A volume's location: a checked :class:`RemoteAddress` for an address, else a ``Path``."""
    if isinstance(value, RemoteAddress):
        return value
    if is_remote(value):
        return check_address(str(value))
    return Path(value)


def check_address(text: str) -> RemoteAddress:
    """``text`` as a :class:`RemoteAddress`; VesuviusError naming it when it has no host or no path to a store."""
    parts = urlsplit(text)
    if not parts.netloc or not re.fullmatch(r"[A-Za-z0-9.\-_\[\]:@]+", parts.netloc):
        raise VesuviusError(f"{text}: not a usable address (expected http(s)://HOST/PATH.zarr or s3://BUCKET/PATH)")
    address = RemoteAddress(text.rstrip("/"))
    if not address.name:
        raise VesuviusError(f"{text}: the address names no store (expected http(s)://HOST/PATH.zarr or "
                            f"s3://BUCKET/PATH)")
    return address


@dataclass(frozen=True, kw_only=True)
class RemoteOptions:
    """How remote stores are read (the ``data.remote_*`` keys): memory cache (MiB), disk cache folder, tries per
    request, first backoff (seconds, doubled per try) and the timeout of one request (seconds)."""

    cache_mb: float = 1024.0
    cache_dir: str | None = None
    retries: int = 5
    backoff_s: float = 0.5
    timeout_s: float = 60.0

    @classmethod
    def from_config(cls, data) -> RemoteOptions:
        """The options of a ``DataConfig``."""
        return cls(cache_mb=data.remote_cache_mb, cache_dir=data.remote_cache_dir, retries=data.remote_retries,
                   backoff_s=data.remote_backoff_s, timeout_s=data.remote_timeout_s)


def cache_folder(root: str | os.PathLike, address: str) -> Path:
    """The disk cache folder of one address under ``root``: readable name + hash of the whole address."""
    digest = hashlib.sha256(address.encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", RemoteAddress(address).name)[:60] or "store"
    return Path(root) / f"{name}-{digest}"


def open_remote_store(address: RemoteAddress, options: RemoteOptions):
    """A read-only zarr store of ``address``: FsspecStore wrapped in a ChunkCache. VesuviusError when the scheme's
    package is missing (``s3://`` needs s3fs)."""
    from zarr.storage import FsspecStore

    from vesuvius_monai.data.chunk_cache import ChunkCache

    storage_options: dict = {}
    if address.lower().startswith(("http://", "https://")):
        import aiohttp

        storage_options["client_kwargs"] = {"timeout": aiohttp.ClientTimeout(total=options.timeout_s)}
    else:
        storage_options["config_kwargs"] = {"connect_timeout": options.timeout_s, "read_timeout": options.timeout_s}
    try:
        store = FsspecStore.from_url(str(address), storage_options=storage_options, read_only=True)
    except ImportError as exc:
        scheme = address.split(":", 1)[0]
        hint = "pip install s3fs" if scheme == "s3" else "pip install fsspec aiohttp"
        raise VesuviusError(f"{address}: reading {scheme}:// addresses needs a package that is not installed "
                            f"({exc}); {hint}") from None
    except Exception as exc:  # fsspec's own check of the address
        raise VesuviusError(f"{address}: not a usable address ({type(exc).__name__}: {exc})") from None
    disk = cache_folder(options.cache_dir, address) if options.cache_dir else None
    return ChunkCache(store, address=str(address), memory_bytes=int(options.cache_mb * 2**20), disk=disk,
                      retries=options.retries, backoff_s=options.backoff_s)
