"""Smoke tests of every script in bench/ (each run as ``python bench/x.py`` on tiny inputs, so that none can rot)
and of the shared helpers in bench/_common.py.

The tiny runs take a few seconds each: one torch thread (``OMP_NUM_THREADS=1``: on a shared 2-core machine a second
thread makes tiny operations wait for a busy core), tiny volumes and models, 1-2 steps. They run two at a time.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml
from skimage.measure import label as sk_label

from vesuvius_monai.config import SynthParams
from vesuvius_monai.data.readers import open_volume
from vesuvius_monai.data.synthetic import make_fragment
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io.nifti import write_nifti
from vesuvius_monai.metrics.betti import tile_betti

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
TIMEOUT_S = 300  # per script; a tiny run takes 2-20 s on an idle 2-core machine
TINY_MODEL = ["model.kwargs={init_features: 4, depth: 2}", "transforms.patch_size=[16,16,16]",
              "infer.roi_size=[16,16,16]", "infer.sw_batch_size=1", "train.batch_size=1", "train.warmup_steps=0",
              "train.val_every=1"]
TINY_DATA = ["synth.n_fragments=4", "synth.params.shape=[24,32,32]"]


@pytest.fixture
def bench(monkeypatch):
    """The bench folder's modules (they import ``_common`` as a top-level module)."""
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("bench_recipes"), importlib.import_module("_common")


def run_script(script: str, args: list[str]) -> subprocess.CompletedProcess:
    """``python bench/<script> args...`` from the repository root, one torch thread, stdout and stderr captured."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(BENCH / script), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT_S)


def recipes_args(tmp: Path, seeds: list[str], systems: list[str], out: str, *extra: str) -> list[str]:
    """A tiny bench_recipes run: one family of 32^3 fragments, 0.3 s of training per system; ``extra`` flags."""
    return ["--minutes", "0.005", "--families", "thin", "--fragment-shape", "32", "--split", "1", "1", "1",
            "--data-dir", str(tmp / "data"), "--run-dir", str(tmp / "runs"), "--out", str(tmp / out),
            "--set", "default:model.kwargs={init_features: 4, depth: 2}", "--seeds", *seeds, "--systems", *systems,
            *extra, "--", "transforms.patch_size=[32,32,32]", "infer.roi_size=[32,32,32]"]


def tiny_runs(tmp: Path) -> dict[str, tuple[list[list[str]], list[str]]]:
    """script -> (the arguments of its tiny runs, made one after the other; words that must all stand in one line
    of the table header each run prints), longest first."""
    data = [f"data.root={tmp / 'data'}", *TINY_DATA, *TINY_MODEL]
    return {
        # bench_distributed.py has no tiny mode of its own: its smallest flags (two runs, one under torchrun)
        "bench_distributed.py": ([["--steps", "1", "--reps", "1", "--features", "4", "--patch", "16", "--threads",
                                   "1", "--work", str(tmp / "work")]], ["training, resunet3d init_features 4"]),
        # a first seed with two systems, then a second seed (the first seed's runs are reused)
        "bench_recipes.py": ([recipes_args(tmp, ["0"], ["default", "basicunet"], "first.json", "--default-inference",
                                           "basicunet"),
                              recipes_args(tmp, ["0", "1"], ["default"], "second.json")],
                             ["system family", "n", "steps", "ckpt_step", "dice", "score"]),
        "bench_checkpointing.py": ([["--patch", "16", "16", "16", "--features", "4", "--depth", "2", "--reps", "1",
                                     "--steps", "1", "--out", str(tmp / "checkpointing.json")]],
                                   ["mode", "median s/step", "steps", "median peak MiB"]),
        "bench_tta_postprocess.py": ([["--run-dir", str(tmp / "tta"), "--min-sizes", "0", "10", "--fill-holes", "0",
                                       "--", *data, "train.steps=1"]], ["setting", "tta_views", "infer_s"]),
        "bench_predict.py": ([["--sizes", "32", "--features", "4", "--no-before", "--repeats", "1", "--window-edges",
                               "32", "--out", str(tmp / "predict.json"), "infer.roi_size=[16,16,16]",
                               "infer.sw_batch_size=1"]], ["volume engine", "wall s", "peak GiB", "wall/model"]),
        "bench_losses.py": ([["--steps", "1", "--losses", "dice", "dice_bce", "--run-dir", str(tmp / "losses"),
                              "--", *data]], ["loss", "leaderboard", "dice", "steps/s"]),
        "bench_blockwise.py": ([["--sizes", "32", "--block", "32", "--window", "16", "--batch", "1", "--threads", "1",
                                 "--workdir", str(tmp), "--out", str(tmp / "blockwise.json")]],
                               ["volume", "windows", "Mvox/s", "overhead", "peak RSS GiB"]),
        "bench_model_speed.py": ([["--settings", "4:16x16x16", "4:16x16x16:depth=2,stem_stride=2", "--batch", "1",
                                   "--reps", "1", "--steps", "2", "--threads", "1", "--out",
                                   str(tmp / "model_speed.json")]],
                                 ["setting", "infer Mvox/s", "train off s/step", "train on s/step", "off/on", "steps"]),
        "bench_metrics.py": ([["--size", "32", "--out", str(tmp / "metrics.json")]], ["metric", "seconds", "value"]),
        "bench_remote.py": ([["--size", "48", "--chunk", "16", "--window", "16", "--block", "16"]],
                            ["fetched MiB", "requests", "fetched/needed", "equal"]),
        "bench_skip_empty.py": ([["--z", "32", "--n", "96", "--out", str(tmp / "skip.json")]],
                                ["setting", "windows run", "skipped", "seconds", "speed-up"]),
        "bench_stack.py": ([["--steps", "6", "--members", "2", "--systems", "default", "--families", "thin",
                             "--fragment-shape", "32", "--split", "1", "1", "1", "--data-dir", str(tmp / "data"),
                             "--run-dir", str(tmp / "runs"), "--", "model.kwargs={init_features: 4, depth: 2}",
                             "transforms.patch_size=[32,32,32]", "infer.roi_size=[32,32,32]",
                             "train.batch_size=1"]],
                           ["system / chain", "LB score", "Dice", "TopoScore"]),
        "bench_tune_heldout.py": ([["--synthetic", "--fragments", "4", "--size", "24", "--val", "2", "--splits", "2",
                                    "--memo", str(tmp / "memo.json")], ["--synthetic", "--fragments", "4", "--size",
                                    "24", "--val", "2", "--splits", "2", "--memo", str(tmp / "memo.json")]],
                                  ["tuner", "changed base", "worse on test (score)"]),
    }


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory) -> dict[str, tuple[list[subprocess.CompletedProcess], Path]]:
    """The tiny runs of every script (:func:`tiny_runs`), two scripts at a time: ``{script: (its finished runs,
    its folder)}``; a script's later runs are skipped once one fails."""
    tmp = tmp_path_factory.mktemp("bench")

    def runs(script: str) -> tuple[list[subprocess.CompletedProcess], Path]:
        folder = tmp / script.removesuffix(".py")
        folder.mkdir()
        done = []
        for args in tiny_runs(folder)[script][0]:
            done.append(run_script(script, args))
            if done[-1].returncode:
                break
        return done, folder

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {script: pool.submit(runs, script) for script in tiny_runs(tmp)}
        return {script: future.result() for script, future in futures.items()}


# runs nnU-Net in its own environment: its own parts are tested at the end, its tiny run where that environment is
OWN_ENVIRONMENT = {"bench_nnunet.py", "bench_nnunet_predict.py"}


def test_every_bench_script_has_a_tiny_run(tmp_path) -> None:
    assert {p.name for p in BENCH.glob("bench_*.py")} - OWN_ENVIRONMENT == set(tiny_runs(tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(tiny_runs(Path("."))))
def test_bench_script_tiny_run(tiny_results, script: str) -> None:
    done, folder = tiny_results[script]
    runs, words = tiny_runs(folder)[script]
    assert len(done) == len(runs)
    for run in done:
        assert run.returncode == 0, f"{script} failed:\n{run.stderr[-3000:]}"
        assert any(all(w in line for w in words) for line in run.stdout.splitlines()), (
            f"{script}: no table header with {words} in its output:\n{run.stdout[-3000:]}")
    for arg in (a for args in runs for a in args):
        if arg.endswith(".json"):
            assert isinstance(json.loads(Path(arg).read_text()), dict)


@pytest.mark.slow
def test_model_speed_compares_channels_last_side_by_side(tiny_results) -> None:
    (done,), folder = tiny_results["bench_model_speed.py"]
    full, strided = json.loads((folder / "model_speed.json").read_text())["settings"].values()
    assert full["model_kwargs"] == {} and strided["model_kwargs"] == {"depth": 2, "stem_stride": 2}
    for row in (full, strided):
        assert len(row["off_steps_s"]) == len(row["on_steps_s"]) == row["steps"] == 2
        assert row["ratio"] == pytest.approx(row["off_s"] / row["on_s"])
    assert "channels_last on vs off: s/step" in done.stdout


# --------------------------------------------------------------------------- shared helpers


def skimage_octant_components(mask: np.ndarray, connectivity: int) -> int:
    """Components of a bool volume (z, y, x) summed over its 2 x 2 x 2 octants (split like ``np.array_split``),
    counted by skimage (26-connected: its connectivity 3, 6-connected: 1), independently of the bench's code."""
    total = 0
    for z in np.array_split(np.arange(mask.shape[0]), 2):
        for y in np.array_split(np.arange(mask.shape[1]), 2):
            for x in np.array_split(np.arange(mask.shape[2]), 2):
                total += sk_label(mask[np.ix_(z, y, x)], connectivity={26: 3, 6: 1}[connectivity]).max()
    return int(total)


@pytest.mark.parametrize("connectivity", [26, 6])
def test_octant_components_match_the_scorer_and_skimage(bench, connectivity: int) -> None:
    _, common = bench
    rng = np.random.default_rng(connectivity)
    for _ in range(30):
        shape = tuple(int(v) for v in rng.integers(2, 17, size=3))
        mask = rng.uniform(size=shape) < rng.uniform(0.05, 0.6)
        expected = skimage_octant_components(mask, connectivity)
        scorer = tile_betti(mask, connectivity=connectivity)[:, 0].sum()
        assert common.octant_components(mask, connectivity=connectivity) == expected == scorer


def test_spread_and_its_text(bench) -> None:
    _, common = bench
    stats = common.spread([0.5, float("nan"), 0.7])
    assert (stats["n"], stats["min"], stats["max"]) == (2, 0.5, 0.7) and stats["mean"] == pytest.approx(0.6)
    assert common.spread_text(stats, ".2f") == "0.60 [0.50-0.70]"
    assert common.spread_text(common.spread([1.0])) == "1.0000"


def test_paired_verdict_over_random_deltas(bench) -> None:
    _, common = bench
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 6))
        base = {i: float(v) for i, v in enumerate(rng.normal(size=n))}
        new = {i: base[i] + float(d) for i, d in zip(base, rng.normal(rng.normal(0, 2), rng.uniform(0.01, 1), n))}
        min_delta = float(rng.uniform(0, 0.5))
        mean, deltas, word = common.paired_verdict(base, new, min_delta)
        assert deltas == pytest.approx([new[i] - base[i] for i in base]) and mean == pytest.approx(np.mean(deltas))
        se = np.std(deltas, ddof=1) / np.sqrt(n) if n > 1 else np.inf
        measurable = n > 1 and all(d * mean > 0 for d in deltas) and abs(mean) > max(2 * se, min_delta)
        assert word == (("helped" if mean > 0 else "hurt") if measurable else "no measurable change")
        flipped = common.paired_verdict(base, new, min_delta, lower_is_better=True)[2]
        assert flipped == {"helped": "hurt", "hurt": "helped"}.get(word, word)
        text = common.verdict_text("dice", base, new, min_delta, unit="round")
        assert text.startswith(f"dice {mean:+.4f} (per round ") and text.endswith(f"): {word}")


def test_synthetic_root_writes_through_synth_and_falls_back(bench, tmp_path) -> None:
    _, common = bench
    overrides = [f"data.root={tmp_path / 'data'}", "synth.n_fragments=2", "synth.params.shape=[12,12,12]"]
    assert common.synthetic_root(None, overrides, tmp_path / "spare") == str(tmp_path / "data")
    image = open_volume(tmp_path / "data" / "images" / "frag_001.nii.gz").read()
    assert np.array_equal(image, make_fragment((0, 1), SynthParams(shape=(12, 12, 12)))[0])
    # the same settings again: reused; other settings: the spare root; both taken: an error naming both
    assert common.synthetic_root(None, overrides, tmp_path / "spare") == str(tmp_path / "data")
    other = [*overrides, "synth.seed=3"]
    assert common.synthetic_root(None, other, tmp_path / "spare") == str(tmp_path / "spare")
    with pytest.raises(VesuviusError, match="spare"):
        common.synthetic_root(None, [*other, "synth.seed=4"], tmp_path / "spare")


def test_synthetic_zarr_tiles_synth_fragments(bench, tmp_path) -> None:
    import zarr

    _, common = bench
    path = common.synthetic_zarr(tmp_path / "v.zarr", 20, tile=8, distinct=3, seed=5)
    volume = zarr.open_array(str(path))[:]
    assert volume.shape == (20, 20, 20) and volume.dtype == np.uint16
    fragments = [make_fragment((5, i), SynthParams(shape=(8, 8, 8), dtype="uint16"))[0] for i in range(3)]
    corners = [(z, y, x) for z in (0, 8, 16) for y in (0, 8, 16) for x in (0, 8, 16)]
    for i, (z, y, x) in enumerate(corners):
        tile = volume[z:z + 8, y:y + 8, x:x + 8]
        assert np.array_equal(tile, fragments[i % 3][:tile.shape[0], :tile.shape[1], :tile.shape[2]])
    assert [p.name for p in tmp_path.iterdir()] == ["v.zarr"]  # the temporary fragments are gone


# --------------------------------------------------------------------------- bench_recipes


# the folder each row of the first tiny run was evaluated into (recipes_runs.evaluation_folders: a fresh run's first
# evaluation goes to eval/)
EVAL_FOLDER = {"default": "eval", "default_untuned": "eval_untuned", "default_plain": "eval_plain",
               "basicunet": "eval", "basicunet_tta": "eval_tta", "basicunet_tta_tuned": "eval_tta_tuned"}


@pytest.mark.slow
def test_bench_recipes_smoke(tiny_results) -> None:
    (done, again), folder = tiny_results["bench_recipes.py"]
    assert done.returncode == again.returncode == 0, done.stderr[-3000:] + again.stderr[-3000:]
    out = done.stdout
    assert "seed 0" in out and "means over seeds" not in out
    for row in ("default thin", "default_untuned thin", "default_plain thin", "basicunet thin", "default all",
                "basicunet all", "basicunet_tta thin", "basicunet_tta_tuned all"):
        assert row in out
    assert "also given the default's inference" in out
    assert "basicunet vs default: leaderboard" in out and "leader per family" in out
    assert "default leads" in out and "of 1 families in Dice" in out
    first = json.loads((folder / "first.json").read_text())
    assert [(r["system"], r["seed"], r["reused"]) for r in first["runs"]] == [
        ("default", 0, False), ("default_untuned", 0, False), ("default_plain", 0, False), ("basicunet", 0, False),
        ("basicunet_tta", 0, False), ("basicunet_tta_tuned", 0, False)]
    tuned, untuned, plain, monai, monai_tta, monai_tuned = first["runs"]  # one checkpoint per system
    # the MONAI checkpoint given the default's inference: its TTA, then post-processing tuned into tune_tta/
    assert monai["scored_step"] == monai_tta["scored_step"] == monai_tuned["scored_step"]
    assert monai_tta["config"]["infer"]["tta_flip_axes"] == monai_tuned["config"]["infer"]["tta_flip_axes"] == [0, 1, 2]
    assert monai_tta["postprocess"] == monai["postprocess"]
    choice = json.loads((Path(monai["run"]) / "tune_tta" / "postprocess.json").read_text())["postprocess"]
    assert monai_tuned["postprocess"] == choice and not (Path(monai["run"]) / "postprocess.json").exists()
    assert monai_tuned["tune_seconds"] > 0 and monai_tta["tune_seconds"] != monai_tta["tune_seconds"]  # NaN
    assert tuned["scored_step"] == untuned["scored_step"] == plain["scored_step"]
    assert untuned["postprocess"]["threshold"] == plain["postprocess"]["threshold"] == 0.5
    assert tuned["postprocess"] == json.loads((Path(tuned["run"]) / "postprocess.json").read_text())["postprocess"]
    assert tuned["tune_seconds"] > 0 and monai["tune_seconds"] != monai["tune_seconds"]  # NaN
    # configs/demo.yaml mirrors on three axes; the plain MONAI pipelines and the _plain row do not
    assert tuned["config"]["infer"]["tta_flip_axes"] == untuned["config"]["infer"]["tta_flip_axes"] == [0, 1, 2]
    assert plain["config"]["infer"]["tta_flip_axes"] == monai["config"]["infer"]["tta_flip_axes"] == []
    assert {Path(r["run"]).name for r in first["runs"][:3]} == {"default"}
    for r in first["runs"]:
        assert r["steps"] >= 1 and r["model"] == ("basicunet" if r["system"].startswith("basicunet") else "resunet3d")
        assert r["config"]["train"]["max_minutes"] == 0.005 and r["config"]["transforms"]["patch_size"] == [32] * 3
        assert r["config"]["train"]["warmup_steps"] == 5000  # configs/demo.yaml: 100 of 2000 steps, of the 100000 cap
        ((frag_id, frag),) = r["fragments"].items()
        assert frag["family"] == "thin" and 0 <= frag["dice"] <= 1 and 0 <= frag["leaderboard"] <= 1
        assert r["component_connectivity"] in (6, 26)
        # the component counts are those of the saved mask and the label, counted again here by skimage
        mask = open_volume(Path(r["run"]) / EVAL_FOLDER[r["system"]] / "predictions" / f"{frag_id}_mask.nii.gz")
        (label_path,) = folder.glob(f"data/*/labels/{frag_id}.nii*")
        label = open_volume(label_path).read()
        keep = label != 2
        assert frag["label_components"] >= 1
        assert frag["label_components"] == skimage_octant_components((label == 1) & keep, r["component_connectivity"])
        assert frag["pred_components"] == skimage_octant_components(mask.read().astype(bool) & keep,
                                                                    r["component_connectivity"])
        assert r["summary"]["thin"]["dice"]["n"] == 1
    assert first["runs"][0]["config"]["model"]["kwargs"] == {"init_features": 4, "depth": 2}
    assert monai["config"]["model"]["kwargs"] == {}
    # a second seed: seed 0's finished run is reused, seed 1 trains; the table gains the means over seeds
    out = again.stdout
    assert "seed 1" in out and "means over seeds [0, 1]" in out
    second = json.loads((folder / "second.json").read_text())
    assert [(r["seed"], r["reused"]) for r in second["runs"]] == [(0, True)] * 3 + [(1, False)] * 3
    assert second["runs"][0]["fragments"] == first["runs"][0]["fragments"]
    assert [r["eval_seconds"] for r in second["runs"][:3]] == [0.0] * 3  # every evaluation of seed 0 is reused


def test_bench_recipes_rejects_bad_arguments(bench, tmp_path) -> None:
    recipes, _ = bench
    for bad in (["--systems", "resnet"], ["--set", "nosuch:train.lr=1"], ["--minutes", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            recipes.main([*bad, "--run-dir", str(tmp_path / "r"), "--data-dir", str(tmp_path / "d")])
        assert exit_info.value.code == 2


# --------------------------------------------------------------------------- bench_nnunet


NNUNET_PYTHON = REPO / ".venv-nnunet" / "bin" / "python"


@pytest.fixture
def nnunet(monkeypatch):
    """bench/bench_nnunet.py as a module (the parts that need only this project)."""
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("bench_nnunet")


def family_fragments(tmp: Path) -> list[dict]:
    """The 'ignore' family (labels 0, 1 and 2) at 16^3, one fragment per split, as bench_recipes lists them."""
    from families import SplitCounts, write_families

    dataset = write_families(tmp / "data", ["ignore"], shape=(16, 16, 16), counts=SplitCounts(train=1, val=1, test=1))
    return [dict(e, image=str(dataset.parent / e["image"]), label=str(dataset.parent / e["label"]))
            for e in yaml.safe_load(dataset.read_text())["fragments"]]


def test_bench_nnunet_exports_nnunets_layout_and_refuses_other_folders(nnunet, tmp_path) -> None:
    fragments = family_fragments(tmp_path)
    args = nnunet.parse_args(["--out-dir", str(tmp_path / "nn")])
    raw = nnunet.export_dataset(args, fragments)
    meta = json.loads((raw / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "surface": 1, "ignore": 2} and meta["numTraining"] == 2
    assert meta["overwrite_image_reader_writer"] == "NibabelIO" and meta["channel_names"] == {"0": "MicroCT"}
    by_split = {f["split"]: f for f in fragments}
    for split, folder in (("train", "imagesTr"), ("val", "imagesTr"), ("test", "imagesTs")):
        frag = by_split[split]
        exported = open_volume(raw / folder / f"{frag['id']}_0000.nii.gz")
        source = open_volume(frag["image"])
        np.testing.assert_array_equal(exported.read(), source.read())  # the same (z, y, x) array, same geometry
        np.testing.assert_allclose(exported.affine, source.affine)
        has_label = (raw / "labelsTr" / f"{frag['id']}.nii.gz").is_file()
        assert has_label == (split != "test")
    label = open_volume(raw / "labelsTr" / f"{by_split['train']['id']}.nii.gz").read()
    np.testing.assert_array_equal(label, open_volume(by_split["train"]["label"]).read())
    assert set(np.unique(label).tolist()) == {0, 1, 2}
    assert nnunet.export_dataset(args, fragments) == raw  # the same fragments: reused
    with pytest.raises(VesuviusError, match="fragments.json"):
        nnunet.export_dataset(args, fragments[:2])
    with pytest.raises(VesuviusError, match="channel name 'MicroCT', not --channel-name 'CT'"):
        nnunet.export_dataset(nnunet.parse_args(["--out-dir", str(tmp_path / "nn"), "--channel-name", "CT"]), fragments)
    assert not list((tmp_path / "nn" / "raw").glob("*.partial"))  # built beside its place, then renamed
    (raw / "fragments.json").unlink()
    with pytest.raises(VesuviusError, match="not written by this bench"):
        nnunet.export_dataset(args, fragments)
    with pytest.raises(SystemExit) as exit_info:  # not a bench_recipes run folder: one error line, exit status 2
        nnunet.main(["--recipes", str(tmp_path), "--out-dir", str(tmp_path / "nn3")])
    assert exit_info.value.code == 2 and not (tmp_path / "nn3").exists()
    planned = tmp_path / "nn" / "planned_with.json"
    planned.write_text('{"gpu_memory_target": null}')  # plans of nnU-Net's default target: another one is refused
    with pytest.raises(VesuviusError, match="choose another --out-dir"):
        nnunet.plan_and_preprocess(nnunet.parse_args(["--out-dir", str(tmp_path / "nn"), "--gpu-memory-target", "1"]),
                                   fragments)
    for bad in (["--minutes", "0"], ["--iterations", "0"]):
        with pytest.raises(VesuviusError, match="--minutes must be > 0"):
            nnunet.parse_args(bad)
    missing = nnunet.parse_args(["--out-dir", str(tmp_path / "nn2"), "--python", str(tmp_path / "no" / "python")])
    with pytest.raises(VesuviusError, match="setup_nnunet.sh"):
        nnunet.plan_and_preprocess(missing, fragments)


def test_bench_nnunet_refuses_label_values_it_cannot_map(nnunet, tmp_path) -> None:
    import nibabel as nib

    bad = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(np.full((4, 4, 4), 3, np.uint8), np.eye(4)), bad)
    with pytest.raises(VesuviusError, match="bad.nii.gz: label values \\[3\\]"):
        nnunet.write_case(str(bad), tmp_path / "out.nii.gz", label=True)
    assert not (tmp_path / "out.nii.gz").exists()


def test_bench_nnunet_scores_masks_as_the_metrics_do(nnunet, tmp_path) -> None:
    """Its scores of a predicted mask equal an independent Dice over the labelled voxels, for random masks."""
    fragments = family_fragments(tmp_path)
    args = nnunet.parse_args(["--out-dir", str(tmp_path / "nn")])
    test = next(f for f in fragments if f["split"] == "test")
    cfg = nnunet.config_from_raw(yaml.safe_load((REPO / "configs" / "demo.yaml").read_text()), [])
    label = open_volume(test["label"]).read()
    rng = np.random.default_rng(0)
    for flip in (0.0, 0.05, 0.3):
        mask = (label == 1) ^ (rng.random(label.shape) < flip)
        folder = tmp_path / "nn" / "seed0" / "predictions"
        folder.mkdir(parents=True, exist_ok=True)
        write_nifti(folder / f"{test['id']}.nii.gz", mask, affine=open_volume(test["label"]).affine, dtype=np.uint8)
        info = {f["id"]: {"family": "ignore", "generator": "g"} for f in fragments}
        row = nnunet.score_run(args, 0, {"steps": 3}, fragments, info, cfg)
        scores = row["fragments"][test["id"]]
        keep = label != 2
        pred, truth = mask[keep], label[keep] == 1
        dice = 2 * (pred & truth).sum() / (pred.sum() + truth.sum())
        assert scores["dice"] == pytest.approx(dice, abs=1e-6)
        assert row["system"] == "nnunet" and row["steps"] == row["scored_step"] == 3
        assert -1e-9 <= scores["leaderboard"] <= 1 + 1e-9 and scores["label_components"] >= 1
        if flip == 0:
            assert scores["leaderboard"] == pytest.approx(1.0)
    (folder / f"{test['id']}.nii.gz").unlink()
    with pytest.raises(VesuviusError, match=f"{test['id']}.nii.gz not found"):
        nnunet.score_run(args, 0, {"steps": 3}, fragments, info, cfg)


@pytest.mark.slow
@pytest.mark.skipif(not NNUNET_PYTHON.is_file(),
                    reason="nnU-Net's environment is not set up (bash bench/setup_nnunet.sh)")
def test_bench_nnunet_tiny_run(tiny_results, tmp_path) -> None:
    """nnU-Net planned, trained for a fraction of a second and predicting, on the tiny bench_recipes run's data."""
    (done, _), folder = tiny_results["bench_recipes.py"]
    assert done.returncode == 0
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "dataset.yaml").write_text((folder / "runs" / "dataset.yaml").read_text())
    (recipes / "results.json").write_text((folder / "second.json").read_text())
    out = run_script("bench_nnunet.py", ["--recipes", str(recipes), "--minutes", "0.005", "--seeds", "0", "--out-dir",
                                         str(tmp_path / "nn"), "--iterations", "1", "--val-iterations", "1",
                                         "--da-processes", "0", "--no-mirroring"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "nnunet thin" in out.stdout and "default thin" in out.stdout and "leader per family" in out.stdout
    (row,) = json.loads((tmp_path / "nn" / "results.json").read_text())["runs"]
    assert row["steps"] >= 1 and 0 <= row["fragments"][next(iter(row["fragments"]))]["dice"] <= 1
