"""Shared fixtures: a tiny synthetic dataset, a config that trains on it in seconds, and one run trained on it.

Tests marked ``slow`` (subprocesses, torchrun, training, anything over about a second) are left out by
``bash scripts/test.sh --quick``; ``bash scripts/test.sh`` runs everything.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from vesuvius_monai.config import load_config
from vesuvius_monai.data.synthetic import SynthParams, write_synthetic_dataset

torch.set_num_threads(2)
sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py: error_line, snapshot


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """Five 32x40x40 synthetic fragments (NIfTI) under images/ and labels/; treat as read-only."""
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_dataset(root, 5, seed=1, params=SynthParams(shape=(32, 40, 40)))
    return root


def tiny_overrides(root: Path, out: Path) -> list[str]:
    """Overrides for a run of a few seconds: tiny model, 16^3 patches, two val / test fragments."""
    return [
        f"data.root={root}", f"output_dir={out}", "data.val_fragments=[frag_003]", "data.test_fragments=[frag_004]",
        "model.kwargs={init_features: 4, depth: 2, norm_groups: 4}", "transforms.patch_size=[16,16,16]",
        "infer.roi_size=[16,16,16]", "infer.sw_batch_size=4", "train.steps=4", "train.batch_size=2",
        "train.val_every=2", "train.warmup_steps=1", "train.log_every=1",
        # the built-in defaults these tests were written against (the recipe's are TTA, Dice + BCE, lr 3e-3)
        "infer.tta_flip_axes=[]", "train.loss={dice: 1.0}", "train.lr=0.002",
    ]


@pytest.fixture(scope="session")
def trained_run(synthetic_root, tmp_path_factory) -> Path:
    """The tiny run (:func:`tiny_overrides`) trained once per session through the command line.

    Its folder holds checkpoints/last.pt and best.pt, config.yaml, the logs. Shared: read it, never write into it;
    a test that writes into a run folder (evaluate, tune-postprocess) copies it into its own tmp_path first.
    """
    from vesuvius_monai.cli import main

    out = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", *tiny_overrides(synthetic_root, out)]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_args():
    """``tiny_args(root, out)``: the overrides of a few-second run, for CLI tests."""
    return tiny_overrides


@pytest.fixture
def make_tiny_config(synthetic_root, tmp_path):
    """``make_tiny_config(name, *extra_overrides)``: a Config training on ``synthetic_root`` into ``tmp_path/name``."""

    def make(name: str = "run", *extra: str):
        return load_config(None, tiny_overrides(synthetic_root, tmp_path / name) + list(extra))

    return make


@pytest.fixture
def tiny_config(make_tiny_config):
    """A Config that trains on ``synthetic_root`` into ``tmp_path/run`` in a few seconds."""
    return make_tiny_config()
