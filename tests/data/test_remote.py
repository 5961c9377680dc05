"""Remote volumes: Zarr / OME-Zarr read over HTTP from a loopback server started here (bench/loopback.py), through
the chunk cache. Predictions equal the local file's bit for bit; each chunk is fetched once; a warm disk cache
fetches nothing; faults are retried; a server that stays down stops the run, which a rerun finishes."""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from zarr.core.buffer import default_buffer_prototype
from zarr.storage import MemoryStore, WrapperStore

from vesuvius_monai.config import load_config
from vesuvius_monai.data.chunk_cache import ChunkCache, RemoteError
from vesuvius_monai.data.dataset import find_in_yaml, volume_id
from vesuvius_monai.data.readers import open_volume
from vesuvius_monai.data.remote import RemoteAddress, RemoteOptions, as_location
from vesuvius_monai.engine.infer import window_grid
from vesuvius_monai.engine.networks import ModuleNetwork
from vesuvius_monai.engine.predict import folder_targets
from vesuvius_monai.engine.zarr_predict import predict_zarr
from vesuvius_monai.engine.remote_reads import peak_live_chunks, planned_reads
from vesuvius_monai.errors import VesuviusError

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from loopback import LoopbackServer  # noqa: E402

CHUNK = 16
SHAPE = (40, 52, 60)
FAST = ["data.remote_backoff_s=0.01", "data.remote_retries=3"]


class TinyNet(torch.nn.Module):
    """Two 3x3x3 convolutions; counts the windows it runs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3, padding=1), torch.nn.Tanh(),
                                       torch.nn.Conv3d(2, 1, 3, padding=1))
        self.windows = 0

    def forward(self, x):
        self.windows += x.shape[0]
        return self.net(x)


def write_ome(path: Path, vol: np.ndarray, fmt: int = 2) -> Path:
    """A two-level OME-Zarr (level 1: every second voxel) with chunks of CHUNK."""
    group = zarr.open_group(path, mode="w", zarr_format=fmt)
    datasets = []
    for level, data in enumerate((vol, vol[::2, ::2, ::2])):
        group.create_array(str(level), shape=data.shape, chunks=(CHUNK,) * 3, dtype=data.dtype)[:] = data
        datasets.append({"path": str(level), "coordinateTransformations": [{"type": "scale",
                                                                             "scale": [2.0**level] * 3}]})
    axes = [{"name": n, "type": "space"} for n in "zyx"]
    group.attrs["multiscales"] = [{"version": "0.4", "axes": axes, "datasets": datasets}]
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(local store, server) of a random uint8 volume of SHAPE; the server's faults reset by each test."""
    root = tmp_path_factory.mktemp("served")
    vol = np.random.default_rng(3).integers(1, 255, SHAPE, dtype=np.uint8)  # no chunk of the fill value
    local = write_ome(root / "scroll.zarr", vol)
    with LoopbackServer(root) as server:
        yield local, server


@pytest.fixture
def server(served):
    server = served[1]
    server.reset()
    server.down, server.down_after, server._faults = False, None, []
    yield server
    server.down, server.down_after, server._faults = False, None, []


def _cfg(*overrides):
    return load_config(None, ["infer.roi_size=[12,12,12]", "infer.block_size=[18,18,18]", "infer.overlap=0.25",
                              "infer.sw_batch_size=4", "infer.out_dtype=float32", "infer.tta_flip_axes=[]",
                              "infer.device=cpu", *overrides])


def _predict(cfg, source, out, roi=None, net=None) -> np.ndarray:
    predict_zarr(cfg, ModuleNetwork(net or TinyNet()), [(source, out)], roi)
    return open_volume(out).read()


def _needed_chunks(reader, cfg, roi=None) -> set:
    """Chunk keys the run reads: the percentile sample's and the windows' (independent of the cache)."""
    region = tuple(slice(0, d) for d in reader.shape) if roi is None else roi
    grid = window_grid(region, cfg.infer)
    return {reader.chunk_key(c) for read in planned_reads(reader, grid, region, grid.blocks()) for c in read}


# --------------------------------------------------------------------------------------------- reading


@pytest.mark.parametrize("fmt", [2, 3])
def test_remote_reads_equal_local_and_fetch_each_chunk_once(tmp_path, fmt):
    vol = np.random.default_rng(fmt).integers(0, 200, SHAPE, dtype=np.uint8)
    write_ome(tmp_path / "v.zarr", vol, fmt)
    with LoopbackServer(tmp_path) as server:
        for level in (0, 1):
            server.reset()
            remote = open_volume(f"{server.url}/v.zarr/", level=level)
            local = open_volume(tmp_path / "v.zarr", level=level)
            assert isinstance(remote.path, RemoteAddress) and remote.path.name == "v.zarr"
            assert (remote.shape, remote.spacing) == (local.shape, local.spacing)
            rng = np.random.default_rng(level)
            for _ in range(6):
                lo = [int(rng.integers(0, d)) for d in local.shape]
                region = tuple(slice(a, int(rng.integers(a + 1, d + 1))) for a, d in zip(lo, local.shape))
                np.testing.assert_array_equal(remote.read(region), local.read(region))
            np.testing.assert_array_equal(remote.read(), local.read())
            counts = Counter(h.path for h in server.chunk_hits(None))
            assert counts and max(counts.values()) == 1, counts.most_common(3)


@pytest.mark.slow
def test_predict_from_http_equals_local_bit_for_bit(served, server, tmp_path):
    """Whole volume and ROI: same output as the local store; a cold run asks for each needed chunk once and for no
    other; a warm disk cache asks for no chunk at all."""
    local, _ = served
    url = f"{server.url}/scroll.zarr"
    cache = tmp_path / "cache"
    for roi in (None, (slice(5, 33), slice(10, 47), slice(0, 41))):
        cfg = _cfg(f"data.remote_cache_dir={cache}-{roi is None}")
        expected = _predict(cfg, local, tmp_path / f"local-{roi is None}.zarr", roi)
        server.reset()
        got = _predict(cfg, url, tmp_path / f"remote-{roi is None}.zarr", roi)
        np.testing.assert_array_equal(got, expected)
        counts = Counter(h.path.split("/scroll.zarr/", 1)[1] for h in server.chunk_hits(None))
        assert max(counts.values()) == 1
        assert set(counts) == _needed_chunks(open_volume(local), cfg, roi)
        server.reset()
        again = _predict(cfg, url, tmp_path / f"warm-{roi is None}.zarr", roi)
        np.testing.assert_array_equal(again, expected)
        assert server.chunk_hits(None) == [] and server.hits  # metadata only
        assert not list(Path(f"{cache}-{roi is None}").rglob("*.tmp*"))


@pytest.mark.slow
def test_small_memory_cache_still_fetches_each_chunk_once(tmp_path):
    """With no disk cache and a memory cache of the planned peak (below the chunks read), no chunk is fetched
    twice: the planned reads keep the halo chunks that later blocks need. (A volume over 2M voxels, so that the
    percentile sample does not read it whole.)"""
    vol = np.random.default_rng(5).integers(1, 255, (128, 128, 160), dtype=np.uint8)
    zarr.open_array(tmp_path / "big.zarr", mode="w", shape=vol.shape, chunks=(32,) * 3, dtype=vol.dtype)[:] = vol
    infer = ["infer.roi_size=[24,24,24]", "infer.block_size=[48,48,48]", "infer.overlap=0.25",
             "infer.sw_batch_size=8", "infer.out_dtype=float32", "infer.tta_flip_axes=[]", "infer.device=cpu"]
    reader = open_volume(tmp_path / "big.zarr")
    region = tuple(slice(0, d) for d in reader.shape)
    grid = window_grid(region, load_config(None, infer).infer)
    reads = list(planned_reads(reader, grid, region, grid.blocks()))
    peak = peak_live_chunks(reads) * reader.chunk_bytes
    total = len({c for read in reads for c in read}) * reader.chunk_bytes
    mb = (peak + 2**14) / 2**20  # (+ what the entries cost besides their values)
    assert mb * 2**20 < 0.75 * total  # (only then does the test show anything)
    cfg = load_config(None, [f"data.remote_cache_mb={mb}", *infer])
    expected = _predict(cfg, tmp_path / "big.zarr", tmp_path / "local.zarr")
    with LoopbackServer(tmp_path) as server:
        got = _predict(cfg, f"{server.url}/big.zarr", tmp_path / "remote.zarr")
        counts = Counter(h.path for h in server.chunk_hits(None))
    np.testing.assert_array_equal(got, expected)
    assert max(counts.values()) == 1 and len(counts) * reader.chunk_bytes == total


# --------------------------------------------------------------------------------------------- faults


@pytest.mark.slow
def test_transient_faults_are_retried(served, server, tmp_path):
    local, _ = served
    cfg = _cfg(*FAST, "data.remote_retries=4")
    expected = _predict(cfg, local, tmp_path / "local.zarr")
    server.fail(2, 500)
    server.drop(1)
    server.truncate(1)
    server.fail(1, 503)
    got = _predict(cfg, f"{server.url}/scroll.zarr", tmp_path / "remote.zarr")
    np.testing.assert_array_equal(got, expected)
    assert sum(h.status != 200 and h.status != 404 for h in server.hits) == 5


@pytest.mark.slow
def test_server_down_stops_the_run_and_a_rerun_resumes(served, server, tmp_path):
    local, _ = served
    cfg = _cfg(*FAST, "data.remote_cache_mb=0")  # no cache: the blocks fetch again what the sample read
    expected = _predict(cfg, local, tmp_path / "local.zarr")
    url = f"{server.url}/scroll.zarr"
    out = tmp_path / "remote.zarr"
    server.down_after = 48 + 40  # the percentile sample reads the 48 chunks, then a few blocks are read
    first = TinyNet()
    with pytest.raises(RemoteError) as err:
        _predict(cfg, url, out, net=first)
    message = str(err.value)
    assert "\n" not in message and url in message and "503" in message and "3 times" in message
    assert first.windows > 0 and not out.exists()
    server.down = False
    second = TinyNet()
    np.testing.assert_array_equal(_predict(cfg, url, out, net=second), expected)
    whole = TinyNet()
    _predict(cfg, local, tmp_path / "again.zarr", net=whole)
    assert 0 < second.windows < whole.windows  # the finished blocks were kept


@pytest.mark.slow
def test_cli_server_down_is_one_error_line(trained_run, synthetic_root, tmp_path, capsys):
    from helpers import error_line

    from vesuvius_monai.cli import main

    vol = open_volume(synthetic_root / "images" / "frag_000.nii.gz").read()
    write_ome(tmp_path / "served" / "frag.zarr", vol)
    with LoopbackServer(tmp_path / "served") as server:
        server.down = True
        args = ["predict", "--checkpoint", str(trained_run / "checkpoints" / "last.pt"), "--input",
                f"{server.url}/frag.zarr", "--output", str(tmp_path / "out.zarr"), *FAST]
        assert main(args) == 2
        line = error_line(capsys)
        assert f"{server.url}/frag.zarr" in line and "503" in line
        server.down = False
        assert main(args) == 0
    assert open_volume(tmp_path / "out.zarr").shape == vol.shape


def test_bad_addresses_are_clear_errors(tmp_path, server, monkeypatch):
    for bad in ("http://", "https:///x.zarr", "s3://"):
        with pytest.raises(VesuviusError, match="not a usable address"):
            open_volume(bad)
    with pytest.raises(VesuviusError, match="no Zarr array or group at this address"):
        open_volume(f"{server.url}/nothing.zarr")
    with pytest.raises(RemoteError, match="failed 2 times"):
        open_volume("http://127.0.0.1:9/x.zarr", remote=RemoteOptions(retries=2, backoff_s=0.01))
    reader = open_volume(f"{server.url}/scroll.zarr")
    server.fail(1, 403)  # (the next chunk)
    with pytest.raises(RemoteError, match="HTTP 403"):
        reader.read()

    def no_s3fs(*args, **kwargs):
        raise ImportError("Install s3fs to access S3")

    monkeypatch.setattr(zarr.storage.FsspecStore, "from_url", no_s3fs)
    with pytest.raises(VesuviusError, match="pip install s3fs"):
        open_volume("s3://bucket/scroll.zarr")


# --------------------------------------------------------------------------------------------- addresses


def test_addresses_are_not_mangled(tmp_path):
    from vesuvius_monai.cli import build_parser

    url = "https://example.org/data/scroll1.zarr"
    args = build_parser().parse_args(["predict", "--checkpoint", "c.pt", "--input", url, "--input", "a.npy",
                                      "--output", "out"])
    assert args.input == [url, Path("a.npy")]
    assert volume_id(as_location(url)) == "scroll1" and as_location(url + "/").name == "scroll1.zarr"
    assert folder_targets([as_location(url)], tmp_path / "out") == [(url, tmp_path / "out" / "scroll1.zarr")]
    yaml = tmp_path / "data.yaml"
    yaml.write_text(f"fragments:\n  - image: {url}\n  - image: local.zarr\n    id: b\n")
    first, second = find_in_yaml(yaml)
    assert (first.image, first.id, type(first.image)) == (url, "scroll1", RemoteAddress)
    assert second.image == tmp_path / "local.zarr"
    with pytest.raises(VesuviusError, match="local files"):
        from vesuvius_monai.engine.predict import predict

        predict(_cfg(), "missing.pt", "a.npy", url)


def test_remote_config_keys_are_checked():
    with pytest.raises(VesuviusError, match="data.remote_cache_mb"):
        load_config(None, ["data.remote_cache_mb=-1"])
    with pytest.raises(VesuviusError, match="data.remote_retries"):
        load_config(None, ["data.remote_retries=0"])
    with pytest.raises(VesuviusError, match="data.remote_timeout_s"):
        load_config(None, ["data.remote_timeout_s=0"])


# --------------------------------------------------------------------------------------------- the cache


class Counting(WrapperStore):
    """Counts the gets that reach the wrapped store."""

    def __init__(self, store):
        super().__init__(store)
        self.gets: Counter = Counter()

    def _with_store(self, store):
        return type(self)(store)

    async def get(self, key, prototype, byte_range=None):
        self.gets[key] += 1
        return await self._store.get(key, prototype, byte_range)


def _fill(n_keys: int, size: int) -> MemoryStore:
    store = MemoryStore()
    buf = default_buffer_prototype().buffer
    for k in range(n_keys):
        asyncio.run(store.set(f"c/{k}", buf.from_bytes(bytes([k % 256]) * size)))
    return store


@settings(deadline=None, derandomize=True, database=None, max_examples=40)
@given(st.lists(st.lists(st.integers(0, 11), min_size=1, max_size=5, unique=True), min_size=1, max_size=25))
def test_planned_cache_of_the_peak_fetches_each_key_once(reads):
    """Whatever the reads, a cache holding ``peak_live_chunks`` values (told the plan) fetches every key once, and
    its memory never exceeds its bound."""
    size = 100
    inner = Counting(_fill(12, size))
    peak = peak_live_chunks([[(k, 0, 0) for k in read] for read in reads])
    cache = ChunkCache(inner, address="mem", memory_bytes=peak * (size + 64))
    cache.expect(f"c/{k}" for read in reads for k in read)

    async def run():
        for read in reads:
            values = await asyncio.gather(*(cache.get(f"c/{k}", default_buffer_prototype()) for k in read))
            assert [v.to_bytes() for v in values] == [bytes([k]) * size for k in read]
            assert cache._held <= cache.memory_bytes

    asyncio.run(run())
    assert max(inner.gets.values()) == 1


def test_lru_bound_and_disk_cache(tmp_path):
    size = 1000
    inner = Counting(_fill(10, size))
    cache = ChunkCache(inner, address="mem", memory_bytes=3 * (size + 64), disk=tmp_path / "d")
    proto = default_buffer_prototype()

    async def read_all():
        for k in range(10):
            assert (await cache.get(f"c/{k}", proto)).to_bytes() == bytes([k]) * size
            assert cache._held <= cache.memory_bytes

    asyncio.run(read_all())
    assert sorted(p.name for p in (tmp_path / "d" / "c").iterdir()) == [str(k) for k in range(10)]
    assert len(cache._memory) == 3
    fresh = ChunkCache(inner, address="mem", memory_bytes=0, disk=tmp_path / "d")
    cache = fresh
    asyncio.run(read_all())
    assert max(inner.gets.values()) == 1 and fresh.stats["disk_hits"] == 10
    assert asyncio.run(fresh.get("c/missing", proto)) is None
