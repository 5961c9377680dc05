import numpy as np
import pytest
import torch

from vesuvius_monai.config import DataConfig, TransformConfig
from vesuvius_monai.data.dataset import load_splits
from vesuvius_monai.data.patches import PatchDataset, pad_to, patch_region, prepare_sources
from vesuvius_monai.errors import VesuviusError


@pytest.fixture
def sources(synthetic_root, tmp_path):
    splits = load_splits(DataConfig(root=str(synthetic_root), val_fragments=["frag_003"], test_fragments=["frag_004"]))
    return prepare_sources(splits["train"], TransformConfig(patch_size=(16, 16, 16)), tmp_path / "cache")


def _dataset(sources, **cfg):
    return PatchDataset(sources, TransformConfig(**{"patch_size": (16, 16, 16), **cfg}), seed=0, length=32,
                        ignore_index=2)


def test_patch_region_stays_inside():
    assert patch_region((10, 20, 30), (8, 8, 8), np.array([0, 19, 15])) == (slice(0, 8), slice(12, 20), slice(11, 19))
    assert patch_region((4, 20, 20), (8, 8, 8), np.array([2, 2, 2]))[0] == slice(0, 4)


def test_pad_to_pads_at_the_end():
    out = pad_to(np.ones((2, 3, 4)), (4, 3, 5), 9)
    assert out.shape == (4, 3, 5) and out[3, 0, 0] == 9 and out[0, 0, 0] == 1


def test_items_have_patch_shape_and_are_deterministic(sources):
    ds = _dataset(sources)
    a, b = ds[5], ds[5]
    assert a["image"].shape == a["label"].shape == (1, 16, 16, 16)
    assert a["image"].dtype == torch.float32
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert not torch.equal(ds[6]["image"], a["image"])
    assert set(torch.unique(a["label"]).tolist()) <= {0.0, 1.0, 2.0}


def test_positive_fraction_balances_patches(sources):
    source = sources[0]
    label = source.fragment.label.read()

    def surface_share(pos):
        ds = _dataset(sources, pos_fraction=pos)
        rng = np.random.default_rng(0)
        return np.mean([label[tuple(ds.sample_centre(source, rng))] == 1 for _ in range(200)])

    assert surface_share(1.0) == 1.0  # every centre is a surface voxel
    background = np.mean(label != 1)
    assert surface_share(0.0) < 1.0 - background / 2  # uniform centres hit background about as often as it occurs
    assert surface_share(0.0) < surface_share(0.5) < 1.0


def test_augmentation_keeps_image_and_label_aligned(sources):
    # with intensity jitter off, the un-augmented relation "mean intensity on surface > off surface" must hold
    # in every augmented patch, and flips/rotations must move image and label together: compare with the
    # patch read without augmentation, up to the same flip/rotation.
    plain = _dataset(sources, flip_prob=0, rot90_prob=0, intensity_prob=0)
    aug = _dataset(sources, flip_prob=0.5, rot90_prob=0.5, intensity_prob=0)
    for i in range(16):
        p, a = plain[i], aug[i]
        candidates = []
        for k in range(4):
            for flips in [(), (1,), (2,), (3,), (1, 2), (1, 3), (2, 3), (1, 2, 3)]:
                img = torch.rot90(p["image"], k, dims=(2, 3))
                lab = torch.rot90(p["label"], k, dims=(2, 3))
                if flips:
                    img, lab = img.flip(flips), lab.flip(flips)
                candidates.append((img, lab))
        match = [torch.equal(img, a["image"]) for img, _ in candidates]
        assert any(match), f"item {i}: augmented image is no flip/rotation of the plain one"
        assert any(torch.equal(lab, a["label"]) for (img, lab), m in zip(candidates, match) if m)


def test_nan_in_image_is_reported(sources, monkeypatch):
    reader = sources[0].fragment.image
    original = reader.read
    monkeypatch.setattr(reader, "read", lambda region=None: np.full_like(original(region), np.nan, dtype=np.float32))
    ds = PatchDataset(sources[:1], TransformConfig(patch_size=(16, 16, 16)), seed=0, length=4, ignore_index=2)
    with pytest.raises(VesuviusError, match="NaN"):
        ds[0]


def test_bad_training_label_is_caught_while_indexing(synthetic_root, tmp_path):
    import shutil

    from vesuvius_monai.io.nifti import write_nifti

    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    write_nifti(root / "labels" / "frag_000.nii.gz", np.full((32, 40, 40), 3, np.uint8))
    splits = load_splits(DataConfig(root=str(root), val_fragments=["frag_003"], test_fragments=["frag_004"]))
    with pytest.raises(VesuviusError, match=r"labels/frag_000\.nii\.gz has values \[3\]"):
        prepare_sources(splits["train"], TransformConfig(patch_size=(16, 16, 16)), tmp_path / "cache", 2)


def test_rank_items_split_the_global_batch():
    """W processes of batch b read exactly the items of one process of batch W*b, step by step, none twice."""
    from vesuvius_monai.data.patches import rank_items

    rng = np.random.default_rng(0)
    for _ in range(50):
        world, batch, steps, first = (int(v) for v in (rng.integers(1, 5), rng.integers(1, 4), rng.integers(0, 6),
                                                       rng.integers(0, 40)))
        single = rank_items(first, steps, world * batch)
        per_rank = [rank_items(first, steps, batch, rank, world) for rank in range(world)]
        for step in range(steps):
            union = [i for items in per_rank for i in items[step * batch:(step + 1) * batch]]
            assert union == single[step * world * batch:(step + 1) * world * batch]
        flat = [i for items in per_rank for i in items]
        assert len(set(flat)) == len(flat) == steps * world * batch
    assert rank_items(6, 2, 3) == [6, 7, 8, 9, 10, 11]
    assert rank_items(0, 2, 1, rank=1, world_size=2) == [1, 3]
    with pytest.raises(VesuviusError):
        rank_items(0, 1, 1, rank=2, world_size=2)
