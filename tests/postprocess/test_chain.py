"""The chain: with the new keys off it is the old chain; block by block it equals the whole volume; its Zarr mask."""


import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage
from skimage.morphology import remove_small_objects

from vesuvius_monai.config import PostprocessConfig
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io.zarr_store import PredictionStore
from vesuvius_monai.metrics.components import cavity_labels
from vesuvius_monai.postprocess import postprocess
from vesuvius_monai.postprocess.blockwise import halo, postprocess_blocks, whole_keys, write_mask_zarr

RANK = {6: 1, 18: 2, 26: 3}
radii = st.tuples(st.integers(0, 2), st.integers(0, 2), st.integers(0, 2))


def random_prob(seed: int, shape) -> np.ndarray:
    noise = ndimage.gaussian_filter(np.random.default_rng(seed).random(shape), 1.0)
    return ((noise - noise.min()) / max(noise.max() - noise.min(), 1e-9)).astype(np.float32)


def old_chain(prob: np.ndarray, cfg: PostprocessConfig) -> np.ndarray:
    """The chain before the operators were added: threshold, skimage's small-object removal, small cavities."""
    mask = prob > cfg.threshold
    if cfg.min_size > 0:
        mask = remove_small_objects(mask, max_size=cfg.min_size - 1, connectivity=RANK[cfg.connectivity])
    if cfg.fill_holes_max > 0:
        labels, is_cavity = cavity_labels(mask, 6)
        mask = mask | (is_cavity & (np.bincount(labels.ravel()) <= cfg.fill_holes_max))[labels]
    return mask


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10**6), st.floats(0.2, 0.8), st.integers(0, 60), st.integers(0, 40),
       st.sampled_from([6, 18, 26]))
def test_new_keys_off_is_the_old_chain(seed, threshold, min_size, fill, connectivity):
    prob = random_prob(seed, (12, 13, 14))
    cfg = PostprocessConfig(threshold=threshold, min_size=min_size, fill_holes_max=fill, connectivity=connectivity)
    assert np.array_equal(postprocess(prob, cfg), old_chain(prob, cfg))


def test_chain_order_removal_before_patching_and_filling():
    """Dust (step 4) goes before cavity filling (step 7): a speck inside a shell is removed, then the shell filled."""
    prob = np.zeros((12, 12, 12), np.float32)
    prob[2:9, 2:9, 2:9] = 0.9
    prob[4:7, 4:7, 4:7] = 0.1
    prob[5, 5, 5] = 0.9
    out = postprocess(prob, PostprocessConfig(min_size=2, fill_voids=True))
    assert out.sum() == 7**3


@pytest.mark.parametrize("kwargs, key", [
    ({"hysteresis_high": 0.4}, "hysteresis_high"),  # not above the threshold 0.5
    ({"hysteresis_high": 1.5}, "hysteresis_high"),
    ({"open_radius": (1, -1, 0)}, "open_radius"),
    ({"close_radius": (1, 1)}, "close_radius"),
    ({"close_per_sheet": "yes"}, "close_per_sheet"),
    ({"patch_holes": 1}, "patch_holes"),
    ({"plug_holes": None}, "plug_holes"),
    ({"fill_voids": 0}, "fill_voids"),
    ({"max_whole_voxels": 0}, "max_whole_voxels"),
])
def test_bad_new_key_is_named(kwargs, key):
    with pytest.raises(VesuviusError, match=rf"'postprocess\.{key}'"):
        PostprocessConfig(**kwargs)


def run_blocks(prob: np.ndarray, cfg: PostprocessConfig, block) -> np.ndarray:
    out = np.zeros(prob.shape, np.uint8)
    seen = np.zeros(prob.shape, np.int64)

    def write(region, mask):
        out[region] = mask
        seen[region] += 1

    postprocess_blocks(lambda region: prob[region], write, prob.shape, cfg, block)
    assert (seen == 1).all()  # every voxel written once
    return out.astype(bool)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10**6), st.tuples(*[st.integers(3, 15)] * 3), st.tuples(*[st.integers(1, 9)] * 3), radii,
       radii, st.booleans(), st.floats(0.3, 0.7))
def test_blockwise_equals_the_whole_volume(seed, shape, block, open_radius, close_radius, plug, threshold):
    prob = random_prob(seed, shape)
    cfg = PostprocessConfig(threshold=threshold, open_radius=open_radius, close_radius=close_radius,
                            plug_holes=plug)
    assert np.array_equal(run_blocks(prob, cfg, block), postprocess(prob, cfg))


@pytest.mark.parametrize("kwargs", [{"close_radius": (2, 2, 2)}, {"open_radius": (2, 1, 2)}])
def test_a_smaller_halo_would_differ(kwargs, monkeypatch):
    """The halo is tight: one voxel less and some block differs (so the property test above can fail)."""
    import vesuvius_monai.postprocess.blockwise as bw

    prob = random_prob(5, (16, 16, 16))
    cfg = PostprocessConfig(**kwargs)
    monkeypatch.setattr(bw, "halo", lambda c, real=bw.halo: tuple(h - 1 for h in real(c)))
    assert not np.array_equal(run_blocks(prob, cfg, (3, 3, 3)), postprocess(prob, cfg))


def test_halo():
    assert halo(PostprocessConfig(open_radius=(1, 0, 2), close_radius=(2, 1, 0), plug_holes=True)) == (10, 6, 8)


@pytest.mark.parametrize("kwargs", [{"min_size": 5}, {"hysteresis_high": 0.7}, {"fill_voids": True},
                                    {"patch_holes": True}, {"fill_holes_max": 3},
                                    {"close_per_sheet": True, "close_radius": (1, 1, 1)}])
def test_component_operators_run_whole_under_the_limit_and_refuse_over_it(kwargs):
    prob = random_prob(1, (10, 11, 12))
    cfg = PostprocessConfig(**kwargs)
    assert whole_keys(cfg)
    assert np.array_equal(run_blocks(prob, cfg, (4, 4, 4)), postprocess(prob, cfg))
    small = PostprocessConfig(**kwargs, max_whole_voxels=10 * 11 * 12 - 1)
    key = next(iter(kwargs)) if "close_radius" not in kwargs else "close_per_sheet"
    with pytest.raises(VesuviusError, match=rf"'postprocess\.{key}'.*postprocess\.max_whole_voxels = 1319"):
        run_blocks(prob, small, (4, 4, 4))


def prob_store(path, prob: np.ndarray, chunks=(5, 6, 7)) -> PredictionStore:
    store = PredictionStore.create(path, prob.shape, block_size=chunks, dtype="float32")
    store.array[...] = prob
    store.mark_complete()
    return store


def test_write_mask_zarr(tmp_path):
    prob = random_prob(2, (12, 13, 14))
    prob_store(tmp_path / "p.zarr", prob)
    cfg = PostprocessConfig(close_radius=(1, 1, 1), plug_holes=True)
    out = write_mask_zarr(tmp_path / "p.zarr", tmp_path / "m.zarr", cfg, progress=False)
    import zarr

    group = zarr.open_group(str(out), mode="r")
    assert group["0"].dtype == np.uint8 and group["0"].chunks == (5, 6, 7)
    stored = PredictionStore.open(tmp_path / "p.zarr", mode="r").read_probabilities()
    assert np.array_equal(group["0"][...], postprocess(stored, cfg).astype(np.uint8))
    assert group.attrs["vesuvius_mask"]["postprocess"]["plug_holes"] is True
    assert group.attrs["multiscales"][0]["datasets"][0]["path"] == "0"
    write_mask_zarr(tmp_path / "p.zarr", out, PostprocessConfig(), progress=False)  # its own: replaced
    assert np.array_equal(zarr.open_group(str(out), mode="r")["0"][...], (stored > 0.5).astype(np.uint8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.zarr", "p.zarr"]  # nothing left beside


def test_write_mask_zarr_refuses_a_folder_it_did_not_write(tmp_path):
    prob_store(tmp_path / "p.zarr", random_prob(2, (6, 6, 6)))
    theirs = tmp_path / "m.zarr"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    with pytest.raises(VesuviusError, match="did not write"):
        write_mask_zarr(tmp_path / "p.zarr", theirs, PostprocessConfig(), progress=False)
    assert (theirs / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.zarr", "p.zarr"]


def test_write_mask_zarr_refuses_an_unfinished_store_and_a_large_whole_chain(tmp_path):
    store = PredictionStore.create(tmp_path / "p.zarr", (6, 6, 6), block_size=(3, 3, 3), dtype="float32")
    with pytest.raises(VesuviusError, match="not complete"):
        write_mask_zarr(tmp_path / "p.zarr", tmp_path / "m.zarr", PostprocessConfig(), progress=False)
    store.mark_complete()
    with pytest.raises(VesuviusError, match="postprocess.min_size"):
        write_mask_zarr(tmp_path / "p.zarr", tmp_path / "m.zarr",
                        PostprocessConfig(min_size=3, max_whole_voxels=100), progress=False)
    assert not (tmp_path / "m.zarr").exists() and len(list(tmp_path.iterdir())) == 1


def test_a_zarr_mask_has_the_pyramid_of_its_probabilities(tmp_path):
    """Every level the mask's multiscales lists exists, each the 2x2x2 max of the one below (odd edges partial)."""
    import zarr

    prob = random_prob(4, (21, 18, 11))
    store = prob_store(tmp_path / "p.zarr", prob)
    store.build_pyramid(3)
    out = write_mask_zarr(tmp_path / "p.zarr", tmp_path / "m.zarr", PostprocessConfig(), progress=False)
    group = zarr.open_group(str(out), mode="r")
    paths = [d["path"] for d in group.attrs["multiscales"][0]["datasets"]]
    assert paths == ["0", "1", "2"]
    for k in (1, 2):
        below = group[str(k - 1)][...]
        padded = np.pad(below, [(0, d % 2) for d in below.shape])
        expected = padded.reshape(padded.shape[0] // 2, 2, padded.shape[1] // 2, 2, padded.shape[2] // 2, 2)
        assert np.array_equal(group[str(k)][...], expected.max(axis=(1, 3, 5)))
