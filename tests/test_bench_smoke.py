"""Smoke test of bench/bench_recipes.py (tiny fragments, seconds of training) and its shared helpers."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
from skimage.measure import label as sk_label

from vesuvius_monai.metrics.topology import tile_betti

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def bench(monkeypatch):
    """The bench folder's modules (they import ``_common`` as a top-level module)."""
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("bench_recipes"), importlib.import_module("_common")


@pytest.mark.parametrize("connectivity, sk_connectivity", [(26, 3), (6, 1)])
def test_octant_components_match_the_scorer_and_skimage(bench, connectivity: int, sk_connectivity: int) -> None:
    _, common = bench
    rng = np.random.default_rng(connectivity)
    for _ in range(30):
        shape = tuple(int(v) for v in rng.integers(2, 17, size=3))
        mask = rng.uniform(size=shape) < rng.uniform(0.05, 0.6)
        expected = 0
        for z in np.array_split(np.arange(shape[0]), 2):
            for y in np.array_split(np.arange(shape[1]), 2):
                for x in np.array_split(np.arange(shape[2]), 2):
                    expected += sk_label(mask[np.ix_(z, y, x)], connectivity=sk_connectivity).max()
        scorer = tile_betti(mask, connectivity=connectivity)[:, 0].sum()
        assert common.octant_components(mask, connectivity=connectivity) == expected == scorer


def test_spread_and_its_text(bench) -> None:
    _, common = bench
    stats = common.spread([0.5, float("nan"), 0.7])
    assert (stats["n"], stats["min"], stats["max"]) == (2, 0.5, 0.7) and stats["mean"] == pytest.approx(0.6)
    assert common.spread_text(stats, ".2f") == "0.60 [0.50-0.70]"
    assert common.spread_text(common.spread([1.0])) == "1.0000"


def test_bench_recipes_smoke(bench, tmp_path, capsys) -> None:
    recipes, _ = bench
    run_dir = tmp_path / "runs"
    common = ["--minutes", "0.005", "--families", "thin", "--fragment-shape", "32", "--split", "1", "0", "1",
              "--data-dir", str(tmp_path / "data"), "--run-dir", str(run_dir),
              "--set", "default:model.kwargs={init_features: 4, depth: 2}",
              "transforms.patch_size=[32,32,32]", "infer.roi_size=[32,32,32]"]
    recipes.main([*common, "--seeds", "0", "--systems", "default", "basicunet"])
    out = capsys.readouterr().out
    assert "seed 0" in out and "means over seeds" not in out
    for row in ("default thin", "basicunet thin", "default all", "basicunet all"):
        assert row in out
    first = json.loads((run_dir / "results.json").read_text())
    assert [(r["system"], r["seed"], r["reused"]) for r in first["runs"]] == [("default", 0, False),
                                                                             ("basicunet", 0, False)]
    for r in first["runs"]:
        assert r["steps"] >= 1 and r["model"] == ("resunet3d" if r["system"] == "default" else "basicunet")
        assert r["config"]["train"]["max_minutes"] == 0.005 and r["config"]["transforms"]["patch_size"] == [32] * 3
        assert r["config"]["train"]["warmup_steps"] == 5000  # configs/demo.yaml: 20 of 400 steps, of the 100000 cap
        (frag,) = r["fragments"].values()
        assert frag["family"] == "thin" and 0 <= frag["dice"] <= 1 and 0 <= frag["leaderboard"] <= 1
        assert frag["label_components"] >= 1 and frag["pred_components"] >= 0
        assert r["component_connectivity"] in (6, 26)
        assert r["summary"]["thin"]["dice"]["n"] == 1
    assert first["runs"][0]["config"]["model"]["kwargs"] == {"init_features": 4, "depth": 2}
    assert first["runs"][1]["config"]["model"]["kwargs"] == {}
    # a second seed: seed 0's finished run is reused, seed 1 trains; the table gains the means over seeds
    recipes.main([*common, "--seeds", "0", "1", "--systems", "default"])
    out = capsys.readouterr().out
    assert "seed 1" in out and "means over seeds [0, 1]" in out
    second = json.loads((run_dir / "results.json").read_text())
    assert [(r["seed"], r["reused"]) for r in second["runs"]] == [(0, True), (1, False)]
    assert second["runs"][0]["fragments"] == first["runs"][0]["fragments"]


def test_bench_recipes_rejects_bad_arguments(bench, tmp_path) -> None:
    recipes, _ = bench
    for bad in (["--systems", "resnet"], ["--set", "nosuch:train.lr=1"], ["--minutes", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            recipes.main([*bad, "--run-dir", str(tmp_path / "r"), "--data-dir", str(tmp_path / "d")])
        assert exit_info.value.code == 2
