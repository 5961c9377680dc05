"""The block engine: every window of MONAI's sliding-window grid computed exactly once, block by block.

Blocks (see :mod:`vesuvius_monai.engine.windows`) are processed in C order by three threads in a pipeline:

* a reader reads and normalises the input of the next block (its extent: the block plus the far-side reach of
  its own windows, no near-side halo) while the network runs;
* the network thread runs the block's own windows in batches and accumulates ``importance * probability`` over
  the extent (on the inference device);
* a writer adds the spills of the block's predecessors, stores the block's own spills for its successors,
  divides by the blending weight sum (recomputed from the grid, never stored) and hands the block to the sink,
  which writes it and marks it done; only then are the spills the block consumed dropped.

The result equals MONAI's ``sliding_window_inference`` of the whole volume (same windows, same importance maps,
same sum / weight blending) up to float summation order. Memory holds about four block extents at a time,
whatever the volume size; spills live in a :class:`Spills` store (on disk for Zarr outputs, so a killed run
resumes: a block's spills are written before its done-marker). A block's result depends only on its own
windows (batched per z-start plane, see ``WindowGrid.window_batches``) and the stored spills, added in a fixed
order, so a resumed run is bit-identical to an uninterrupted one.

Only the windows the output needs are run: those touching the job's ``roi`` (the blocks written are those it
touches; their predecessors outside it are recomputed like another process's, see below), and, with a ``content``
function (:mod:`vesuvius_monai.engine.support`), only windows whose input holds some scroll. A window left out
contributes nothing to the sums but keeps its blending weight: the output is that of a network predicting 0 on it.
An ROI's output is thus the whole volume's prediction restricted to the ROI (same grid, same windows).

The predictor's values need not be probabilities: a job with ``finish`` blends whatever it returns (e.g. logits,
as nnU-Net v2 does) and applies ``finish`` pointwise to each blended block before the sink sees it; a skipped
window then counts as predicting the job's ``empty`` value (e.g. a large negative logit) instead of 0.

Several processes share a volume by each predicting a set of blocks (``run_blocks(blocks=...)``, see
:mod:`vesuvius_monai.engine.predict`: contiguous slabs of z-planes of blocks). A predecessor that another process
owns and has not finished yet has left no spill: its spilling z-planes of windows are recomputed here (same
batches, so the same sums, bit for bit on the same hardware and thread count) and stored like its owner would
store them. Spill files are written atomically, so the owner and a recomputing neighbour writing the same file
leave one of two identical copies.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from vesuvius_monai.data.regions import Region, Triple, intersect, region_shape, relative, shift_region
from vesuvius_monai.engine.sinks import Sink, Spills
from vesuvius_monai.engine.windows import WindowGrid, importance

logger = logging.getLogger(__name__)

Predictor = Callable[[torch.Tensor], torch.Tensor]  # (B, 1, z, y, x) -> probabilities (B, C, z, y, x), C >= 1
Reader = Callable[[Region], np.ndarray]  # padded-coordinate region -> normalised float32 input of its shape
Content = Callable[[Region], np.ndarray]  # padded-coordinate region -> bool (its shape): True where there is scroll


@dataclass(frozen=True)
class BlockJob:
    """What the engine computes and how: MONAI's window ``grid`` over a volume in blocks, the reader of its
    normalised input (padded coordinates), the ``predictor``, windows per network call (``batch``), the blending
    (``blend`` "gaussian" or "constant", ``sigma_scale``) and the ``device`` where the sums are accumulated.

    ``roi``: the part of the volume (volume coordinates) written to the sink, whose origin is the ROI's first voxel
    (None: the whole volume). ``content``: where the input holds scroll (None: everywhere); windows without any are
    skipped (see the module docstring). ``finish``: a pointwise map of each blended block (float32 array -> same
    shape) applied before it is written (None: none; the blend is the output); ``empty``: what a skipped window
    counts as predicting (see the module docstring)."""

    grid: WindowGrid
    read: Reader
    predictor: Predictor
    batch: int
    blend: str
    sigma_scale: float
    device: torch.device
    roi: Region | None = None
    content: Content | None = None
    finish: Callable[[np.ndarray], np.ndarray] | None = None
    empty: float = 0.0

    def padded_roi(self) -> Region:
        """The region written, in the grid's padded coordinates."""
        return shift_region(self.output_roi(), self.grid.pad_lo)

    def output_roi(self) -> Region:
        """The region written (volume coordinates)."""
        return self.roi or tuple(slice(0, d) for d in self.grid.shape)  # type: ignore[return-value]

    def blocks(self) -> list[Triple]:
        """The blocks that write part of the ROI, in C order."""
        return self.grid.blocks_touching(self.output_roi()) if self.roi else list(self.grid.blocks())

    def output(self, index: Triple) -> tuple[Region, Region] | None:
        """(region of the ROI that block ``index`` writes, relative to the ROI; the same voxels relative to the
        block), or None when it writes none."""
        region, crop = self.grid.output_region(index)
        part = intersect(region, self.output_roi())
        if part is None:
            return None
        moved = shift_region(crop, tuple(p.start - r.start for p, r in zip(part, region)))
        return relative(part, self.output_roi()), tuple(slice(m.start, m.start + p.stop - p.start)
                                                        for m, p in zip(moved, part))  # type: ignore[return-value]

    def runs(self, start: Triple, origin: Triple, content: np.ndarray | None) -> bool:
        """Whether the window at ``start`` (padded) is run: it touches the ROI and (with ``content``, over the
        region starting at ``origin``) some scroll."""
        window = tuple(slice(t, t + w) for t, w in zip(start, self.grid.window))
        if self.roi and intersect(window, shift_region(self.roi, self.grid.pad_lo)) is None:  # type: ignore[arg-type]
            return False
        if content is None:
            return True
        return bool(content[tuple(slice(t - o, t - o + w) for t, o, w in zip(start, origin, self.grid.window))].any())

    def weight(self) -> torch.Tensor:
        """MONAI's importance map of one window on the device (float32, window shape)."""
        return torch.from_numpy(importance(self.grid.window, self.blend, float(self.sigma_scale))).to(self.device)


def window_sums(job: BlockJob, region: Region, image: np.ndarray, batches: list[list[Triple]],
                on_batch: Callable[[int], None]) -> np.ndarray:
    """Sum of ``weight * probability`` of the windows in ``batches`` over ``region``; float32 (region shape).

    ``image``: the normalised input over ``region`` (padded coordinates), which holds every window of ``batches``.
    """
    origin, device, weight = tuple(s.start for s in region), job.device, job.weight()
    x = torch.from_numpy(image).to(device)
    if device.type == "cpu":  # numpy memory, like every other buffer of the engine (visible to tracemalloc)
        total = torch.from_numpy(np.zeros(x.shape, dtype=np.float32))
    else:
        total = torch.zeros(x.shape, dtype=torch.float32, device=device)
    for starts in batches:
        windows = [tuple(slice(t - o, t - o + w) for t, o, w in zip(s, origin, job.grid.window)) for s in starts]
        probs = job.predictor(torch.stack([x[w] for w in windows])[:, None])[:, 0].float()
        for w, p in zip(windows, probs):
            total[w].addcmul_(weight, p)
        on_batch(len(windows))
    return total.cpu().numpy()


def kept_batches(job: BlockJob, region: Region, batches: list[list[Triple]],
                 content: np.ndarray | None) -> tuple[list[list[Triple]], list[Triple]]:
    """``batches`` less the windows not run (:meth:`BlockJob.runs`; ``content`` over ``region``), and those."""
    if content is None and not job.roi:
        return batches, []
    origin = tuple(s.start for s in region)
    kept = [[s for s in b if job.runs(s, origin, content)] for b in batches]  # type: ignore[arg-type]
    return [b for b in kept if b], [s for b in batches for s in b if not job.runs(s, origin, content)]


def add_skipped(job: BlockJob, sums: np.ndarray, region: Region, starts: list[Triple]) -> np.ndarray:
    """``sums`` (over ``region``) plus ``weight * job.empty`` over each skipped window at ``starts``; in place, and
    nothing at all when ``job.empty`` is 0."""
    if job.empty and starts:
        filled = importance(job.grid.window, job.blend, float(job.sigma_scale)) * np.float32(job.empty)
        for s in starts:
            sums[tuple(slice(t - r.start, t - r.start + w) for t, r, w in zip(s, region, job.grid.window))] += filled
    return sums


def block_sums(job: BlockJob, index: Triple, loaded: tuple | None,
               on_batch: Callable[[int], None]) -> tuple[np.ndarray, tuple[int, int]]:
    """Sum of ``weight * probability`` of the block's own windows over its extent; float32 (extent shape), and
    (windows run, windows skipped).

    ``loaded``: (normalised input over the extent or None when no window needs it, content or None); None when the
    block owns no window.
    """
    extent = job.grid.extent(index)
    image, content = loaded or (None, None)
    own = job.grid.window_batches(index, job.batch)
    batches, skipped = kept_batches(job, extent, own, content)
    if image is None or not batches:
        n = job.grid.n_own_windows(index) if loaded else 0
        on_batch(n)
        sums = np.zeros(region_shape(extent), dtype=np.float32)
        return add_skipped(job, sums, extent, [s for b in own for s in b] if loaded else []), (0, n)
    on_batch(len(skipped))
    run = sum(len(b) for b in batches)
    return add_skipped(job, window_sums(job, extent, image, batches, on_batch), extent, skipped), (run, len(skipped))


def finish_block(job: BlockJob, index: Triple, sums: np.ndarray, spills: Spills, sink: Sink,
                 windows: tuple[int, int] | None = None) -> None:
    """Add the predecessors' spills, store this block's spills, write sum / weight to the sink, drop used spills.

    ``windows``: (run, skipped) of the block's own windows, told to a sink that has ``note_windows``."""
    grid = job.grid
    extent, block = grid.extent(index), grid.block_region(index)
    total = np.array(sums[relative(block, extent)], dtype=np.float32)
    preds = grid.predecessors(index)
    for pred in preds:
        part = dict(grid.successors(pred))[index]
        total[relative(part, block)] += spills.take((pred, index))
    for succ, part in grid.successors(index):
        spills.put((index, succ), sums[relative(part, extent)])
    total /= grid.weights(index, job.blend, job.sigma_scale)
    if job.finish is not None:
        total = job.finish(total)
    region, crop = job.output(index) or grid.output_region(index)
    if windows is not None and hasattr(sink, "note_windows"):
        sink.note_windows(index, *windows)
    sink.write_block(index, region, total[crop])
    for pred in preds:
        spills.drop((pred, index))


@dataclass(frozen=True)
class Recompute:
    """A block another process owns whose spills into ``targets`` (blocks of this process) are recomputed here from
    the windows of its z-start ``planes``."""

    source: Triple
    targets: tuple[Triple, ...]
    planes: tuple[int, ...]


@dataclass
class RunStats:
    """What one :func:`run_blocks` call did: blocks written, own windows run and skipped (no scroll or outside the
    ROI), windows run again for other processes' spills (and for how many of their blocks)."""

    blocks: int = 0
    windows: int = 0
    recomputed: int = 0
    recomputed_blocks: int = 0
    skipped: int = 0

    def __iadd__(self, other: RunStats) -> RunStats:
        for name in ("blocks", "windows", "recomputed", "recomputed_blocks", "skipped"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self


def schedule(grid: WindowGrid, blocks: list[Triple], done: set[Triple]) -> list[Triple | Recompute]:
    """``blocks`` in C order, each preceded by the recomputations of its predecessors that are neither done nor in
    ``blocks`` (another process's), so that every spill a block takes exists by then."""
    mine = set(blocks)
    tasks: list[Triple | Recompute] = []
    seen: set[Triple] = set()
    for index in sorted(blocks):
        for pred in grid.predecessors(index):
            if pred in mine or pred in done or pred in seen:
                continue
            seen.add(pred)
            targets = tuple(s for s, _ in grid.successors(pred) if s in mine)
            tasks.append(Recompute(pred, targets, grid.spill_planes(pred, list(targets))))
        tasks.append(index)
    return tasks


def _within(part: np.ndarray | None, box: Region, region: Region, dtype) -> np.ndarray | None:
    """``part`` (over ``box``, inside ``region``) in an array over ``region``, zero (False) elsewhere; None stays
    None. With an ROI only the windows touching it run, and they read nothing outside ``box``."""
    if part is None:
        return None
    out = np.zeros(region_shape(region), dtype=dtype)
    out[relative(box, region)] = part
    return out


@torch.inference_mode()
def run_blocks(job: BlockJob, sink: Sink, spills: Spills, *, blocks: list[Triple] | None = None,
               progress: bool = False) -> RunStats:
    """Predict ``blocks`` of ``job`` (default: every block the sink has not done yet; see the module docstring).

    With ``blocks``, the other blocks not done yet belong to other processes: a spill one of them owes ``blocks``
    and has not stored yet is recomputed here (:class:`Recompute`). The network runs in inference mode, in this
    thread.
    """
    grid = job.grid
    done = sink.done_blocks()
    for key in spills.keys():
        if key[1] in done:  # consumed, but the run stopped before dropping it
            spills.drop(key)
    todo = [index for index in job.blocks() if index not in done] if blocks is None else \
        [index for index in sorted(blocks) if index not in done]
    tasks = schedule(grid, todo, done)
    logger.info("%d blocks of %s (%d windows of %s in the grid), %d to predict", len(grid.blocks()),
                grid.block_size, grid.n_windows, grid.window, len(todo))
    stats = RunStats(blocks=len(todo))
    own = sum(grid.n_own_windows(i) for i in todo)
    at_most = own + sum(_n_windows(grid, t) for t in tasks if isinstance(t, Recompute))
    initial = sum(grid.n_own_windows(i) for i in job.blocks()) - own if blocks is None else 0
    bar = tqdm(total=initial + at_most, initial=initial, desc="windows", unit="win", leave=False,
               disable=not progress, dynamic_ncols=True)

    def read(region: Region) -> tuple[np.ndarray | None, np.ndarray | None]:
        box = intersect(region, grid.reach(job.padded_roi())) if job.roi else region
        if box is None:  # no window of the region touches the ROI
            return None, None
        content = job.content(box) if job.content is not None else None
        image = job.read(box) if content is None or content.any() else None
        if box == region:
            return image, content
        return _within(image, box, region, np.float32), _within(content, box, region, bool)

    def load(task: Triple | Recompute) -> tuple | None:
        if isinstance(task, Recompute):  # its owner may have stored the spills meanwhile
            missing = not all(spills.has((task.source, t)) for t in task.targets)
            return read(grid.planes_region(task.source, task.planes)) if missing else None
        return read(grid.extent(task)) if grid.n_own_windows(task) else None

    def compute(task: Triple | Recompute, loaded: tuple | None) -> tuple | np.ndarray | None:
        if not isinstance(task, Recompute):
            sums, (run, skipped) = block_sums(job, task, loaded, bar.update)
            stats.windows += run
            stats.skipped += skipped
            return sums, (run, skipped)
        if loaded is None:
            return None
        region, (image, content) = grid.planes_region(task.source, task.planes), loaded
        planes = [b for b in grid.window_batches(task.source, job.batch) if b[0][0] in task.planes]
        batches, skipped = kept_batches(job, region, planes, content)
        bar.update(len(skipped))
        stats.recomputed += sum(len(b) for b in batches)
        stats.recomputed_blocks += 1
        if image is None or not batches:
            return add_skipped(job, np.zeros(region_shape(region), dtype=np.float32), region,
                               [s for b in planes for s in b])
        return add_skipped(job, window_sums(job, region, image, batches, bar.update), region, skipped)

    def finish(task: Triple | Recompute, result: tuple | np.ndarray | None) -> None:
        if not isinstance(task, Recompute):
            finish_block(job, task, result[0], spills, sink, result[1])  # type: ignore[index]
        elif result is not None:
            sums = result
            region, parts = grid.planes_region(task.source, task.planes), dict(grid.successors(task.source))
            for target in task.targets:
                spills.put((task.source, target), sums[relative(parts[target], region)])

    start = time.perf_counter()
    try:
        busy = _pipeline(tasks, load, compute, finish)
    finally:
        bar.close()
    wall = time.perf_counter() - start
    logger.info("%d windows in %.1f s; the network thread was busy %.1f s of it (%.0f%%)",
                stats.windows + stats.recomputed, wall, busy, 100 * busy / max(wall, 1e-9))
    if stats.skipped:
        logger.info("windows of these blocks: %d run, %d skipped (no scroll in their input, or outside the ROI)",
                    stats.windows, stats.skipped)
    if stats.recomputed:
        logger.info("%d of these windows recomputed the spills of %d blocks of other processes",
                    stats.recomputed, stats.recomputed_blocks)
    return stats


def _n_windows(grid: WindowGrid, task: Recompute) -> int:
    """Windows of a recomputation: its planes' share of the source block's own windows."""
    own_z = grid.axes[0].own_starts(task.source[0])
    return grid.n_own_windows(task.source) // len(own_z) * len(task.planes)


def _pipeline(todo: list, load: Callable, compute: Callable, finish: Callable) -> float:
    """load(next) in a reader thread and finish(previous) in a writer thread while compute(current) runs here.

    At most one block is being read ahead and one waits for the writer. Returns the seconds spent in ``compute``.
    """
    reader, writer = ThreadPoolExecutor(1, "vesuvius-read"), ThreadPoolExecutor(1, "vesuvius-write")
    busy = 0.0
    try:
        pending: Future | None = reader.submit(load, todo[0]) if todo else None
        written: Future | None = None
        for k, index in enumerate(todo):
            image = pending.result()  # type: ignore[union-attr]
            pending = reader.submit(load, todo[k + 1]) if k + 1 < len(todo) else None
            tic = time.perf_counter()
            sums = compute(index, image)
            busy += time.perf_counter() - tic
            del image
            if written is not None:
                written.result()
            written = writer.submit(finish, index, sums)
            del sums
        if written is not None:
            written.result()
    finally:
        reader.shutdown(wait=True, cancel_futures=True)
        writer.shutdown(wait=True, cancel_futures=True)
    return busy
