"""Hostile or broken data descriptions (issue 20): ids that would leave their folder, duplicate ids, paths that are
not strings, labels without a labelled voxel. Each gets one VesuviusError naming the file and the entry."""

import logging

import numpy as np
import pytest
import yaml

from vesuvius_monai.config import DataConfig, TransformConfig
from vesuvius_monai.data.dataset import find_fragments, load_splits
from vesuvius_monai.data.patches import prepare_sources
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io.nifti import write_nifti
from vesuvius_monai.io.paths import check_parents, inside, safe_name


def _write_pair(root, frag_id, label_value=0, shape=(8, 8, 8)):
    for folder, value in (("images", 0), ("labels", label_value)):
        path = root / folder / f"{frag_id}.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_nifti(path, np.full(shape, value, np.uint8))


def _dataset(tmp_path, entries):
    path = tmp_path / "data.yaml"
    path.write_text(yaml.safe_dump({"fragments": entries}))
    return DataConfig(dataset=str(path))


# --------------------------------------------------------------------------- names and paths


@pytest.mark.parametrize("name, problem", [
    ("../../../ESCAPED", "path separator"), ("a/b", "path separator"), ("a\\b", "path separator"),
    ("..", "'..'"), ("a..b", "'..'"), (".hidden", "starts with '.'"), ("a\nb", "control character"),
    ("a\x00b", "control character"), ("", "is empty"), ("x" * 201, "longer than 200 bytes"),
])
def test_safe_name_refuses_names_that_leave_or_hide(name, problem):
    with pytest.raises(VesuviusError, match=f"fragment X .*{problem}"):
        safe_name(name, "fragment X")


@pytest.mark.parametrize("name", ["frag_000", "1004283650", "scroll-1.part2", "Fragment 7 (left)"])
def test_safe_name_keeps_ordinary_ids(name):
    assert safe_name(name, "id") == name


def test_inside_refuses_a_path_out_of_its_folder(tmp_path):
    assert inside(tmp_path, "a_prob.nii.gz") == tmp_path / "a_prob.nii.gz"
    with pytest.raises(VesuviusError, match="outside its folder"):
        inside(tmp_path / "predictions", "../../x.nii.gz")
    (tmp_path / "link").symlink_to(tmp_path.parent)
    with pytest.raises(VesuviusError, match="outside its folder"):
        inside(tmp_path, "link")


def test_check_parents_names_the_file_in_the_way(tmp_path):
    (tmp_path / "afile").write_text("mine")
    check_parents(tmp_path / "new" / "x.nii.gz", "--output")  # missing folders are fine: they will be made
    with pytest.raises(VesuviusError, match=r"--output .*afile/x\.nii\.gz: .*afile is a file, not a folder"):
        check_parents(tmp_path / "afile" / "x.nii.gz", "--output")
    assert (tmp_path / "afile").read_text() == "mine"


# --------------------------------------------------------------------------- dataset YAML entries


def test_an_id_that_leaves_its_folder_is_refused(tmp_path):
    _write_pair(tmp_path, "a")
    cfg = _dataset(tmp_path, [{"id": "../../../ESCAPED", "image": "images/a.nii.gz", "label": "labels/a.nii.gz"}])
    with pytest.raises(VesuviusError, match=r"data\.yaml: fragments\[0\]\.id '\.\./\.\./\.\./ESCAPED' holds a path"):
        find_fragments(cfg)


def test_an_id_from_the_image_name_is_checked_too(tmp_path):
    _write_pair(tmp_path, "a")
    (tmp_path / "images" / ".a.nii.gz").write_bytes((tmp_path / "images" / "a.nii.gz").read_bytes())
    cfg = _dataset(tmp_path, [{"image": "images/.a.nii.gz", "label": "labels/a.nii.gz"}])
    with pytest.raises(VesuviusError, match=r"fragments\[0\]\.id '\.a' starts with '\.'"):
        find_fragments(cfg)


def test_duplicate_ids_name_both_entries(tmp_path):
    for frag_id in "abc":
        _write_pair(tmp_path, frag_id)
    entries = [{"id": "x" if frag_id != "b" else "b", "image": f"images/{frag_id}.nii.gz",
                "label": f"labels/{frag_id}.nii.gz"} for frag_id in "abc"]
    with pytest.raises(VesuviusError, match=r"data\.yaml: fragments\[0\] and fragments\[2\] have the same id 'x'"):
        find_fragments(_dataset(tmp_path, entries))


def test_an_image_name_that_gives_an_id_twice_is_refused(tmp_path):
    _write_pair(tmp_path, "a")
    cfg = _dataset(tmp_path, [{"image": "images/a.nii.gz", "label": "labels/a.nii.gz"},
                              {"id": "a", "image": "images/a.nii.gz", "label": "labels/a.nii.gz"}])
    with pytest.raises(VesuviusError, match=r"fragments\[0\] and fragments\[1\] have the same id 'a'"):
        find_fragments(cfg)


def test_two_volumes_with_one_id_in_a_folder_are_refused(tmp_path):
    _write_pair(tmp_path, "a")
    np.save(tmp_path / "images" / "a.npy", np.zeros((8, 8, 8), np.uint8))
    with pytest.raises(VesuviusError, match=r"images/a\.nii\.gz and .*images/a\.npy have the same fragment id 'a'"):
        find_fragments(DataConfig(root=str(tmp_path)))


def test_an_unsafe_id_in_the_ids_csv_is_refused(tmp_path):
    _write_pair(tmp_path, "a")
    (tmp_path / "ids.csv").write_text("id\n../a\n")
    with pytest.raises(VesuviusError, match=r"ids\.csv: id '\.\./a' holds a path separator"):
        find_fragments(DataConfig(root=str(tmp_path), ids_csv=str(tmp_path / "ids.csv")))


@pytest.mark.parametrize("entry, message", [
    ({"image": 5, "label": "labels/a.nii.gz"}, r"fragments\[0\]\.image must be a path \(a non-empty string\), got 5"),
    ({"image": None, "label": "labels/a.nii.gz"}, r"fragments\[0\]\.image must be a path"),
    ({"image": ["a"], "label": "labels/a.nii.gz"}, r"fragments\[0\]\.image must be a path"),
    ({"image": "images/a.nii.gz", "label": 7}, r"fragments\[0\]\.label must be a path \(a string\), got 7"),
    ({"id": ["a"], "image": "images/a.nii.gz"}, r"fragments\[0\]\.id must be a string, got \['a'\]"),
    ({"image": "images/a.nii.gz", 3: "x", "other": 1}, r"fragments\[0\] must be a mapping.*\['3', 'other'\]"),
])
def test_entries_of_the_wrong_type_are_named(tmp_path, entry, message):
    _write_pair(tmp_path, "a")
    with pytest.raises(VesuviusError, match=r"data\.yaml: " + message):
        find_fragments(_dataset(tmp_path, [entry]))


def test_a_numeric_id_is_still_read_as_text(tmp_path):
    _write_pair(tmp_path, "a")
    files = find_fragments(_dataset(tmp_path, [{"id": 1004283650, "image": "images/a.nii.gz"}]))
    assert files[0].id == "1004283650"


# --------------------------------------------------------------------------- labels without a labelled voxel


def _split_root(tmp_path, values):
    """Fragments a, b, c, ... with labels filled with ``values`` (one per fragment): train = all but the last two,
    val = the second to last, test = the last."""
    ids = [chr(ord("a") + i) for i in range(len(values))]
    for frag_id, value in zip(ids, values):
        _write_pair(tmp_path, frag_id, label_value=value)
    return DataConfig(root=str(tmp_path), val_fragments=[ids[-2]], test_fragments=[ids[-1]])


def test_a_validation_split_of_ignore_labels_is_an_error(tmp_path):
    cfg = _split_root(tmp_path, [1, 2, 1])
    with pytest.raises(VesuviusError, match=r"the val fragments have no labelled voxel .*labels/b\.nii\.gz"):
        load_splits(cfg)


def test_a_test_split_of_ignore_labels_is_an_error(tmp_path):
    cfg = _split_root(tmp_path, [1, 1, 2])
    with pytest.raises(VesuviusError, match=r"the test fragments have no labelled voxel .*labels/c\.nii\.gz"):
        load_splits(cfg)


def test_a_training_split_of_ignore_labels_is_an_error(tmp_path):
    cfg = _split_root(tmp_path, [2, 2, 1, 1])
    splits = load_splits(cfg)
    with pytest.raises(VesuviusError, match=r"the train fragments have no labelled voxel .*labels/a\.nii\.gz, "
                                            r".*labels/b\.nii\.gz"):
        prepare_sources(splits["train"], TransformConfig(patch_size=(8, 8, 8)), tmp_path / "cache")


def test_one_labelled_fragment_is_enough(tmp_path):
    cfg = _split_root(tmp_path, [2, 0, 1, 1])
    sources = prepare_sources(load_splits(cfg)["train"], TransformConfig(patch_size=(8, 8, 8)), tmp_path / "cache")
    assert len(sources) == 2


def test_background_only_labels_are_a_warning(tmp_path, caplog):
    cfg = _split_root(tmp_path, [0, 0, 0])
    with caplog.at_level(logging.WARNING):
        splits = load_splits(cfg)
        prepare_sources(splits["train"], TransformConfig(patch_size=(8, 8, 8)), tmp_path / "cache")
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("train fragments hold no surface voxel" in w for w in warned), warned
    assert any("val fragments hold no surface voxel" in w for w in warned), warned


def test_a_cache_folder_through_an_existing_file_is_one_line(tmp_path):
    from vesuvius_monai.data.fg_index import load_or_build_foreground_index
    from vesuvius_monai.data.readers import open_volume

    _write_pair(tmp_path, "a", label_value=1)
    (tmp_path / "afile").write_bytes(b"mine")
    label = open_volume(tmp_path / "labels" / "a.nii.gz")
    with pytest.raises(VesuviusError, match=r"foreground index cache .*afile is a file, not a folder"):
        load_or_build_foreground_index(label, tmp_path / "afile" / "cache")
    assert (tmp_path / "afile").read_bytes() == b"mine"
