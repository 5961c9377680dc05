import numpy as np
import pytest
import tifffile
import yaml

from vesuvius_monai.config import DataConfig
from vesuvius_monai.data.dataset import find_fragments, load_splits, open_fragment, split_fragments
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io.nifti import write_nifti


def _write_pair(root, frag_id, image, label, layout=("images", "labels"), suffix=".nii.gz"):
    for folder, array in zip(layout, (image, label)):
        path = root / folder / f"{frag_id}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        if suffix == ".tif":
            tifffile.imwrite(path, array)
        else:
            write_nifti(path, array)
    return root


def _vol(shape=(8, 8, 8), value=0, dtype=np.uint8):
    return np.full(shape, value, dtype=dtype)


def test_folder_layout_pairs_by_name(synthetic_root):
    files = find_fragments(DataConfig(root=str(synthetic_root)))
    assert [f.id for f in files] == [f"frag_{i:03d}" for i in range(5)]
    assert all(f.label.name == f.image.name for f in files)


def test_competition_layout_with_ids_csv(tmp_path):
    for frag_id in ("1004283650", "102536988", "105796630"):
        _write_pair(tmp_path, frag_id, _vol(), _vol(value=1), layout=("train_images", "train_labels"), suffix=".tif")
    (tmp_path / "train.csv").write_text("id,scroll_id\n102536988,1\n105796630,2\n")
    files = find_fragments(DataConfig(root=str(tmp_path), ids_csv=str(tmp_path / "train.csv")))
    assert [f.id for f in files] == ["102536988", "105796630"]
    assert files[0].label.parent.name == "train_labels"


def test_image_without_label_is_named(tmp_path):
    _write_pair(tmp_path, "a", _vol(), _vol())
    write_nifti(tmp_path / "images" / "b.nii.gz", _vol())
    with pytest.raises(VesuviusError, match=r"b\.nii\.gz has no label"):
        find_fragments(DataConfig(root=str(tmp_path)))


def test_missing_root_explains(tmp_path):
    with pytest.raises(VesuviusError, match="no 'images/'"):
        find_fragments(DataConfig(root=str(tmp_path / "nothing")))


def test_dataset_yaml_with_fixed_splits(tmp_path):
    for frag_id in "abc":
        _write_pair(tmp_path, frag_id, _vol(), _vol())
    listing = {"fragments": [
        {"id": "a", "image": "images/a.nii.gz", "label": "labels/a.nii.gz", "split": "train"},
        {"id": "b", "image": "images/b.nii.gz", "label": "labels/b.nii.gz", "split": "val"},
        {"id": "c", "image": "images/c.nii.gz", "label": "labels/c.nii.gz", "split": "test"},
    ]}
    (tmp_path / "dataset.yaml").write_text(yaml.safe_dump(listing))
    cfg = DataConfig(dataset=str(tmp_path / "dataset.yaml"))
    splits = split_fragments(find_fragments(cfg), cfg)
    assert {k: [f.id for f in v] for k, v in splits.items()} == {"train": ["a"], "val": ["b"], "test": ["c"]}


def test_split_is_by_fragment_seeded_and_disjoint(synthetic_root):
    cfg = DataConfig(root=str(synthetic_root), val_fraction=0.2, test_fraction=0.2, split_seed=3)
    a = split_fragments(find_fragments(cfg), cfg)
    b = split_fragments(find_fragments(cfg), cfg)
    ids = {k: [f.id for f in v] for k, v in a.items()}
    assert ids == {k: [f.id for f in v] for k, v in b.items()}
    assert len(ids["val"]) == 1 and len(ids["test"]) == 1 and len(ids["train"]) == 3
    assert len(set(sum(ids.values(), []))) == 5


def test_unknown_fragment_id_in_split(synthetic_root):
    cfg = DataConfig(root=str(synthetic_root), val_fragments=["frag_999"])
    with pytest.raises(VesuviusError, match="data.val_fragments.*frag_999"):
        split_fragments(find_fragments(cfg), cfg)


def test_shape_mismatch_names_both_files(tmp_path):
    _write_pair(tmp_path, "a", _vol((8, 8, 8)), _vol((8, 8, 9)))
    cfg = DataConfig(root=str(tmp_path))
    with pytest.raises(VesuviusError, match=r"labels/a\.nii\.gz has shape \(8, 8, 9\).*images/a\.nii\.gz"):
        open_fragment(find_fragments(cfg)[0], cfg)


def test_bad_label_values_are_named(tmp_path):
    label = _vol()
    label[0, 0, 0] = 7
    _write_pair(tmp_path, "a", _vol(), label)
    cfg = DataConfig(root=str(tmp_path))
    with pytest.raises(VesuviusError, match=r"labels/a\.nii\.gz has values \[7\]"):
        open_fragment(find_fragments(cfg)[0], cfg)


def test_load_splits_opens_everything_lazily(synthetic_root):
    splits = load_splits(DataConfig(root=str(synthetic_root), val_fragments=["frag_001"], test_fragments=["frag_002"]))
    assert [f.id for f in splits["val"]] == ["frag_001"]
    fragment = splits["train"][0]
    assert fragment.image.shape == fragment.label.shape == (32, 40, 40)


def test_zero_fractions_keep_every_fragment_for_training(synthetic_root):
    cfg = DataConfig(root=str(synthetic_root), val_fraction=0.0, test_fraction=0.0)
    splits = split_fragments(find_fragments(cfg), cfg)
    assert len(splits["train"]) == 5 and not splits["val"] and not splits["test"]


def test_invalid_dataset_yaml_is_named(tmp_path):
    (tmp_path / "dataset.yaml").write_text("fragments: [unclosed\n")
    with pytest.raises(VesuviusError, match="dataset.yaml is not valid YAML"):
        find_fragments(DataConfig(dataset=str(tmp_path / "dataset.yaml")))
