"""Geometry of sliding-window inference over a volume, cut into blocks that each own a set of windows.

The windows are MONAI's own grid (``sliding_window_inference``): a volume axis shorter than the window is padded
to the window (``pad_lo = (window - size) // 2`` zeros before it), the stride is MONAI's ``_get_scan_interval``
and the starts come from MONAI's ``dense_patch_slices``, one axis at a time (the 3D grid is their product):
0, s, 2s, ... plus a last window flush with the end. All positions here are in *padded* coordinates. With
``steps="nnunet"`` the starts are nnU-Net v2's instead (:func:`nnunet_starts`, its
``compute_steps_for_sliding_window``: as many windows, spread evenly); the padding is the same (nnU-Net's
``pad_nd_image`` also puts ``(window - size) // 2`` zeros before an axis shorter than the window).

Blocks tile the padded volume with an edge that is a multiple of the stride and at least one window (an axis
with a single window is one block), so block boundaries are window starts. A block owns the windows whose start
lies in it; their span (the block's *extent*) reaches at most into the next block along each axis. The part of
the extent beyond the block is a *spill* to the up to 7 successor blocks (+z, +y, +x and their combinations),
so a block's sum is final once its own windows and the spills of its up to 7 predecessors are added.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
from monai.data.utils import compute_importance_map, dense_patch_slices
from monai.inferers.utils import _get_scan_interval
from scipy.ndimage import gaussian_filter

from vesuvius_monai.data.regions import BlockIndices, Region, Triple, intersect, region_shape, relative
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io.memory import check_memory

MAX_BLOCKS = 10_000_000  # a grid of more blocks is refused (each block has its files and bookkeeping)
BLOCK_BUFFERS = 4  # block extents of float32 the engine holds at a time

OFFSETS = [o for o in itertools.product((0, 1), repeat=3) if any(o)]  # successor = index + o, in this order


@dataclass(frozen=True)
class Axis:
    """One axis of the grid: volume ``size``, window, stride, padding, window starts and block edge."""

    size: int
    window: int
    stride: int
    pad_lo: int
    starts: tuple[int, ...]
    block: int

    @property
    def padded(self) -> int:
        """Length of the padded axis: max(size, window)."""
        return max(self.size, self.window)

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.padded / self.block)

    def block_span(self, j: int) -> tuple[int, int]:
        """[start, stop) of block ``j`` (padded coordinates)."""
        return j * self.block, min((j + 1) * self.block, self.padded)

    def own_starts(self, j: int) -> tuple[int, ...]:
        """Starts of the windows that block ``j`` owns (start inside the block)."""
        lo, hi = self.block_span(j)
        return tuple(t for t in self.starts if lo <= t < hi)

    def extent(self, j: int) -> tuple[int, int]:
        """[start, stop) of block ``j`` together with the windows it owns."""
        lo, hi = self.block_span(j)
        return lo, max([hi] + [t + self.window for t in self.own_starts(j)])

    def covering_starts(self, j: int) -> tuple[int, ...]:
        """Starts of every window that overlaps block ``j`` (owned by it or by block j - 1)."""
        lo, hi = self.block_span(j)
        return tuple(t for t in self.starts if t < hi and t + self.window > lo)


def axis_steps(size: int, window: int, overlap: float, block: int) -> tuple[int, int]:
    """(stride, block edge) of the axis of MONAI's grid for a volume axis of ``size`` (see the module docstring)."""
    padded = max(size, window)
    stride = _get_scan_interval((padded,), (window,), 1, (overlap,))[0]
    edge = padded if padded == window else stride * math.ceil(max(block, window) / stride)  # one window: one block
    return stride, edge


def nnunet_starts(size: int, window: int, step: float) -> tuple[int, ...]:
    """nnU-Net v2's window starts along an axis of (padded) ``size`` >= ``window`` with ``tile_step_size`` ``step``
    (``compute_steps_for_sliding_window``): ceil((size - window) / (window * step)) + 1 windows, the i-th at
    round(i * (size - window) / (n - 1)) (numpy's rounding, half to even)."""
    n = int(np.ceil((size - window) / (window * step))) + 1
    if n == 1:
        return (0,)
    return tuple(int(np.round((size - window) / (n - 1) * i)) for i in range(n))


def make_axis(size: int, window: int, overlap: float, block: int, steps: str = "monai") -> Axis:
    """The axis of the grid (``steps`` "monai" or "nnunet") for a volume axis of ``size``; ``block`` is rounded up
    (see module docstring). Blocks need only be at least a window long, so either set of starts suits them."""
    padded = max(size, window)
    stride, edge = axis_steps(size, window, overlap, block)
    if steps == "nnunet":
        starts = nnunet_starts(padded, window, 1.0 - overlap)
    else:
        starts = tuple(int(s[0].start) for s in dense_patch_slices((padded,), (window,), (stride,)))
    return Axis(size=size, window=window, stride=stride, pad_lo=(padded - size) // 2, starts=starts, block=edge)


def check_blocks(shape: Triple, window: Triple, edges: Triple) -> None:
    """Raise a VesuviusError naming ``infer.block_size`` when blocks of ``edges`` cut the (padded) volume of
    ``shape`` into more than :data:`MAX_BLOCKS` blocks, or when the engine's block buffers (``BLOCK_BUFFERS`` float32
    blocks at a time, see :mod:`vesuvius_monai.engine.blockwise`) cannot fit the CPU's available memory."""
    padded = [max(d, w) for d, w in zip(shape, window)]
    n = math.prod(math.ceil(p / e) for p, e in zip(padded, edges))
    if n > MAX_BLOCKS:
        raise VesuviusError(f"config key 'infer.block_size': blocks of {list(edges)} cut the volume of shape "
                            f"{tuple(shape)} into {n:,} blocks, more than {MAX_BLOCKS:,}; choose larger blocks")
    block = [min(e, p) for e, p in zip(edges, padded)]
    check_memory(BLOCK_BUFFERS * 4 * math.prod(block), f"config key 'infer.block_size': inference in blocks of {block}")


class WindowGrid:
    """MONAI's sliding-window grid of a (z, y, x) volume, cut into blocks (see the module docstring).

    ``shape``: the volume (z, y, x); ``window``: the window size; ``overlap``: MONAI's overlap in [0, 1);
    ``block``: wanted block edges (rounded up to multiples of the stride, at least one window); ``steps``:
    "monai" (MONAI's starts) or "nnunet" (nnU-Net v2's, tile step 1 - overlap). A grid of more than
    :data:`MAX_BLOCKS` blocks, or with blocks too large for memory, is refused before anything is listed.
    """

    def __init__(self, shape: Triple, window: Triple, overlap: float, block: Triple, steps: str = "monai") -> None:
        self.shape = tuple(int(d) for d in shape)
        self.window = tuple(int(w) for w in window)
        edges = tuple(axis_steps(d, w, overlap, b)[1] for d, w, b in zip(self.shape, self.window, block))
        check_blocks(self.shape, self.window, edges)  # type: ignore[arg-type]
        self.axes = tuple(make_axis(d, w, overlap, b, steps) for d, w, b in zip(self.shape, self.window, block))

    @property
    def block_size(self) -> Triple:
        return tuple(a.block for a in self.axes)  # type: ignore[return-value]

    @property
    def counts(self) -> Triple:
        """Number of blocks per axis."""
        return tuple(a.n_blocks for a in self.axes)  # type: ignore[return-value]

    @property
    def pad_lo(self) -> Triple:
        return tuple(a.pad_lo for a in self.axes)  # type: ignore[return-value]

    @property
    def n_windows(self) -> int:
        """Windows in the whole grid (each is computed exactly once)."""
        return math.prod(len(a.starts) for a in self.axes)

    def blocks(self) -> BlockIndices:
        """Every block index, in C order (the processing order: predecessors come first), made on demand."""
        return BlockIndices(self.counts)

    def blocks_touching(self, region: Region) -> list[Triple]:
        """The blocks that write part of ``region`` (volume coordinates), in C order."""
        spans = []
        for a, s in zip(self.axes, region):
            lo, hi = s.start + a.pad_lo, s.stop + a.pad_lo
            spans.append(range(lo // a.block, min(a.n_blocks, -(-hi // a.block))))
        return [(z, y, x) for z in spans[0] for y in spans[1] for x in spans[2]]

    def block_region(self, index: Triple) -> Region:
        """The block (padded coordinates)."""
        return tuple(slice(*a.block_span(j)) for a, j in zip(self.axes, index))  # type: ignore[return-value]

    @property
    def inside(self) -> Region:
        """The volume itself in the grid's padded coordinates (MONAI pads around it)."""
        return tuple(slice(p, p + d) for p, d in zip(self.pad_lo, self.shape))  # type: ignore[return-value]

    def reach(self, roi: Region) -> Region:
        """Where a window that touches ``roi`` (padded coordinates) can read: ``roi`` grown by the window less one
        voxel on each side (padded coordinates, not clipped)."""
        return tuple(slice(r.start - w + 1, r.stop + w - 1) for r, w in zip(roi, self.window))  # type: ignore

    def extent(self, index: Triple) -> Region:
        """The block plus the far-side reach of its own windows (padded coordinates): its input region.

        A block that owns no window (none starts in it along some axis) reaches nowhere: its extent is itself.
        """
        if not self.n_own_windows(index):
            return self.block_region(index)
        return tuple(slice(*a.extent(j)) for a, j in zip(self.axes, index))  # type: ignore[return-value]

    def window_batches(self, index: Triple, batch: int) -> list[list[Triple]]:
        """The block's own window starts (padded coordinates), in C order, cut into batches of at most ``batch``.

        Batches never mix z-start planes: recomputing any z-plane of windows reproduces its batches exactly.
        """
        own = [a.own_starts(j) for a, j in zip(self.axes, index)]
        batches = []
        for z in own[0]:
            plane = [(z, y, x) for y in own[1] for x in own[2]]
            batches += [plane[i:i + batch] for i in range(0, len(plane), batch)]
        return batches

    def n_own_windows(self, index: Triple) -> int:
        return math.prod(len(a.own_starts(j)) for a, j in zip(self.axes, index))

    def spill_planes(self, index: Triple, targets: list[Triple]) -> tuple[int, ...]:
        """z-starts of the block's own windows that cover any voxel of its spills into the successors ``targets``.

        Recomputing these z-planes of windows (same batches) gives those spills bit for bit: the other planes add
        nothing there. Only the plane(s) reaching past the block for +z successors; every plane for same-z ones.
        """
        parts = dict(self.successors(index))
        wz = self.window[0]
        return tuple(t for t in self.axes[0].own_starts(index[0])
                     if any(t < parts[s][0].stop and t + wz > parts[s][0].start for s in targets))

    def planes_region(self, index: Triple, planes: tuple[int, ...]) -> Region:
        """The part of the block's extent that the windows of the z-start ``planes`` cover (padded coordinates)."""
        z, y, x = self.extent(index)
        return slice(min(planes), max(planes) + self.window[0]), y, x  # type: ignore[return-value]

    def successors(self, index: Triple) -> list[tuple[Triple, Region]]:
        """(successor block, the part of this block's extent inside it, padded coordinates) for every spill."""
        out = []
        extent = self.extent(index)
        for offset in OFFSETS:
            succ = tuple(i + o for i, o in zip(index, offset))
            if any(s >= c for s, c in zip(succ, self.counts)):
                continue
            part = intersect(extent, self.block_region(succ))  # type: ignore[arg-type]
            if part is not None:
                out.append((succ, part))
        return out  # type: ignore[return-value]

    def predecessors(self, index: Triple) -> list[Triple]:
        """Blocks that may spill into ``index``, in a fixed order (the order their spills are added)."""
        preds = [tuple(i - o for i, o in zip(index, offset)) for offset in OFFSETS]
        return [p for p in preds if min(p) >= 0 and index in [s for s, _ in self.successors(p)]]  # type: ignore[misc]

    def output_region(self, index: Triple) -> tuple[Region, Region]:
        """(region of the volume this block writes, the same voxels relative to the block): drops padding."""
        block = self.block_region(index)
        inside = tuple(slice(a.pad_lo, a.pad_lo + a.size) for a in self.axes)
        kept = intersect(block, inside)  # type: ignore[arg-type]
        return relative(kept, inside), relative(kept, block)  # type: ignore[arg-type]

    def weights(self, index: Triple, mode: str, sigma_scale: float) -> np.ndarray:
        """The blending weight sum over the block: sum of MONAI importance maps of every window covering it.

        Read-only float32 (block shape), shared between blocks with the same window layout.
        """
        lo = tuple(s.start for s in self.block_region(index))
        covering = tuple(tuple(t - o for t in a.covering_starts(j)) for a, j, o in zip(self.axes, index, lo))
        shape = region_shape(self.block_region(index))
        return _weights(covering, shape, self.window, mode, float(sigma_scale))


@functools.lru_cache(maxsize=8)
def importance(window: Triple, mode: str, sigma_scale: float) -> np.ndarray:
    """The importance map of one window (float32, (z, y, x)): MONAI's, as ``sliding_window_inference`` builds it
    (``mode`` "gaussian" or "constant"), or nnU-Net v2's Gaussian (``mode`` "nnunet", :func:`nnunet_gaussian`)."""
    if mode == "nnunet":
        return nnunet_gaussian(window, sigma_scale)
    return compute_importance_map(window, mode=mode, sigma_scale=sigma_scale, device="cpu",
                                  dtype=torch.float32).numpy()


def nnunet_gaussian(window: Triple, sigma_scale: float) -> np.ndarray:
    """nnU-Net v2's ``compute_gaussian`` in float32 (nnU-Net casts to float16): a unit delta at voxel
    ``window // 2`` filtered by scipy's ``gaussian_filter`` (sigma ``window * sigma_scale``, mode constant, float64),
    scaled to a peak of 10, zeros raised to the smallest nonzero value. (z, y, x) of ``window``."""
    delta = np.zeros(window, dtype=np.float64)
    delta[tuple(w // 2 for w in window)] = 1.0
    gauss = gaussian_filter(delta, [w * sigma_scale for w in window], 0, mode="constant", cval=0)
    gauss = (gauss / gauss.max() * 10).astype(np.float32)
    gauss[gauss == 0] = gauss[gauss != 0].min()
    return gauss


@functools.lru_cache(maxsize=2)  # interior blocks repeat; each entry is a block of float32
def _weights(starts: tuple[tuple[int, ...], ...], shape: Triple, window: Triple, mode: str,
             sigma_scale: float) -> np.ndarray:
    """Sum of importance maps of windows at ``starts`` (per axis, relative to a block of ``shape``), over the block.

    Interior blocks share their relative starts, so the cache computes their weights once.
    """
    imp = importance(window, mode, sigma_scale)
    total = np.zeros(shape, dtype=np.float32)
    block = tuple(slice(0, d) for d in shape)
    for corner in itertools.product(*starts):
        win = tuple(slice(t, t + w) for t, w in zip(corner, window))
        part = intersect(win, block)  # type: ignore[arg-type]
        if part is not None:
            total[part] += imp[relative(part, win)]  # type: ignore[arg-type]
    total.flags.writeable = False
    return total
