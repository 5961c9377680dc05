"""A full disk, for real: the command runs in a subprocess under a file-size limit (``RLIMIT_FSIZE``, SIGXFSZ
ignored, so writes past it fail with EFBIG, as on a full disk with ENOSPC). Saving a checkpoint, writing a Zarr
prediction and writing a NIfTI file each end in one line ``error: file too large writing PATH`` and exit status 2;
the files written before are byte for byte as they were, and no temporary is left."""

import re
import subprocess
import sys

import pytest

from helpers import snapshot
from vesuvius_monai.cli import main
from vesuvius_monai.engine.train import train
from vesuvius_monai.io.zarr_store import PredictionStore

LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
from vesuvius_monai.cli import main
sys.exit(main(sys.argv[2:]))
"""

BLOCKS = ["infer.block_size=[16,16,16]", "infer.out_dtype=float32"]  # blocks of 24^3 float32: 55 KB a chunk


def run_limited(limit: int, argv: list[str]) -> str:
    """Run the command with files limited to ``limit`` bytes; its one error line (after checking exit status 2)."""
    done = subprocess.run([sys.executable, "-c", LIMITED, str(limit), *argv], capture_output=True, text=True,
                          timeout=300)
    errors = re.findall(r"error: [^\r\n]*", done.stderr)
    assert done.returncode == 2 and len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    return errors[0]


@pytest.mark.slow
def test_a_checkpoint_save(make_tiny_config, synthetic_root, tiny_args, tmp_path):
    train(make_tiny_config("r"), stop_at_step=2)  # checkpoints of step 2; the resumed run saves at step 4
    checkpoints = tmp_path / "r" / "checkpoints"
    before = snapshot(checkpoints)
    line = run_limited(min(map(len, before.values())) // 2, ["train", "--resume", *tiny_args(synthetic_root,
                                                                                                tmp_path / "r")])
    assert re.fullmatch(rf"error: file too large writing {re.escape(str(checkpoints))}/(best|last)\.pt", line), line
    assert snapshot(checkpoints) == before  # the step-2 checkpoints, and nothing else


@pytest.mark.slow
def test_a_zarr_prediction(trained_run, synthetic_root, tmp_path):
    args = ["predict", "--checkpoint", str(trained_run / "checkpoints" / "last.pt"), *BLOCKS]
    a, b = (synthetic_root / "images" / f"frag_00{i}.nii.gz" for i in (0, 1))
    many = tmp_path / "many"
    assert main([*args, "--input", str(a), "--output", str(many)]) == 0
    before = snapshot(many)
    line = run_limited(20_000, [*args, "--input", str(a), "--input", str(b), "--output", str(many)])
    assert re.fullmatch(rf"error: file too large writing {re.escape(str(many / 'frag_001.zarr.partial'))}\S*", line)
    assert snapshot(many / "frag_000.zarr") == {k[len("frag_000.zarr/"):]: v for k, v in before.items()}
    assert not (many / "frag_001.zarr").exists() and not list(many.glob("*.lock"))
    assert main([*args, "--input", str(a), "--input", str(b), "--output", str(many)]) == 0  # the rerun finishes it
    assert main([*args, "--input", str(b), "--output", str(tmp_path / "b.zarr")]) == 0  # in one go
    finished, straight = (PredictionStore.open(p, mode="r") for p in (many / "frag_001.zarr", tmp_path / "b.zarr"))
    assert (finished.read_probabilities() == straight.read_probabilities()).all()


@pytest.mark.slow
def test_a_nifti_write(trained_run, synthetic_root, tmp_path):
    out = tmp_path / "p.nii.gz"
    argv = ["predict", "--checkpoint", str(trained_run / "checkpoints" / "last.pt"), "--input",
            str(synthetic_root / "images" / "frag_000.nii.gz"), "--output", str(out)]
    assert main(argv) == 0
    before = out.read_bytes()
    line = run_limited(len(before) // 2, [*argv, "infer.overlap=0.5"])  # other probabilities: another file
    assert line == f"error: file too large writing {out}"
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["p.nii.gz"]
