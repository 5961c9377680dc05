"""An ensemble's Zarr output under torchrun: 2 CPU processes (gloo, 1 thread each) share the members' blocks and
the fusion, and write exactly what one process writes (float32 store, the reference with 1 thread too)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import vesuvius_monai
from vesuvius_monai.cli import main
from vesuvius_monai.config import load_config
from vesuvius_monai.io.checkpoint import Checkpoint
from vesuvius_monai.io.zarr_store import PredictionStore
from vesuvius_monai.models import build_model

SCRIPT = r"""
import sys
from vesuvius_monai.cli import main
from vesuvius_monai.io.zarr_store import PredictionStore

ranks = set()
write_block = PredictionStore.write_block
def spy(self, index, region, probs):
    write_block(self, index, region, probs)
    print(f"WROTE {self.path.name} {index}", flush=True)
PredictionStore.write_block = spy
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_two_ranks_write_the_ensemble_one_process_writes(tmp_path):
    members = {"a": ["model.kwargs={init_features: 4, depth: 2, norm_groups: 2}", "infer.roi_size=[16,16,16]"],
               "b": ["model.name=unet", "model.kwargs={channels: [4, 8], strides: [2], num_res_units: 1}",
                     "infer.roi_size=[12,12,12]", "infer.overlap=0.5"]}
    for i, (name, overrides) in enumerate(members.items()):
        cfg = load_config(None, [*overrides, "infer.tta_flip_axes=[]"])
        torch.manual_seed(i)
        Checkpoint.of(cfg, build_model(cfg.model.name, **cfg.model.kwargs), 0).save(tmp_path / f"{name}.pt")
    np.save(tmp_path / "v.npy", np.random.default_rng(0).normal(1000, 200, (40, 30, 28)).astype(np.float32))
    (tmp_path / "script.py").write_text(SCRIPT)

    def argv(out):
        return ["predict", "--checkpoint", str(tmp_path / "a.pt"), "--checkpoint", str(tmp_path / "b.pt"), "--input",
                str(tmp_path / "v.npy"), "--output", str(out), "infer.block_size=[16,16,16]",
                "infer.out_dtype=float32", "infer.fusion=logit", "--weights", "2", "1"]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(argv(tmp_path / "one.zarr")) == 0
    finally:
        torch.set_num_threads(threads)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(Path(vesuvius_monai.__file__).parents[1]), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "--tee=3", str(tmp_path / "script.py"), *argv(tmp_path / "two.zarr")], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    one = PredictionStore.open(tmp_path / "one.zarr", mode="r")
    two = PredictionStore.open(tmp_path / "two.zarr", mode="r")
    np.testing.assert_array_equal(two.read_probabilities(), one.read_probabilities())
    assert two.meta["ensemble"] == one.meta["ensemble"]
    lines = [line for line in done.stdout.splitlines() if "WROTE" in line]
    for store in ("0.zarr.partial", "1.zarr.partial", "two.zarr.partial"):  # every store shared by both ranks
        ranks = {line.split(":")[0].strip() for line in lines if f"WROTE {store} " in line}
        assert len(ranks) == 2, (store, lines[:20])
    assert not Path(str(tmp_path / "two.zarr") + ".partial").exists()
