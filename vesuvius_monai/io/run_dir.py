"""A training run's folder: its layout, its marker and the rules for starting a run in it (:class:`RunDir`).

Layout (``output_dir``)::

    vesuvius_run.json    marker written first: this folder is a vesuvius_monai training run
    vesuvius_run.lock    while a command writes into the folder (train, plan, tune-postprocess): who (see io/lock.py)
    config.yaml          resolved config of the run
    plan.yaml            the plan of ``vesuvius-monai plan`` (optional; train fills the keys the user leaves out)
    splits.json          fragment ids of train / val / test (also stored in every checkpoint)
    train_log.csv        step, loss and each loss term (means since the previous row), lr, seconds, steps/s, val_dice
    tensorboard/         the same scalars for TensorBoard
    checkpoints/last.pt  latest state, for ``--resume``
    checkpoints/best.pt  best validation Dice
    cache/               surface indices of the training labels (unless ``data.cache_dir``)
    learning_curve.png
    postprocess.json     the post-processing ``tune-postprocess`` chose (optional)
    eval/                the default folder of ``evaluate``

A new run starts only in a new or empty folder, or in one of its own runs stopped before its first checkpoint
(started again); a folder holding anything else is refused untouched. One command at a time writes into a run
folder: it holds the folder's lock (:meth:`RunDir.lock`) meanwhile; a second is refused, naming the first.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from vesuvius_monai import __version__
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io.atomic import write_text
from vesuvius_monai.io.lock import Lock
from vesuvius_monai.io.paths import check_parents

log = logging.getLogger(__name__)

MARKER = "vesuvius_run.json"
LOCK_FILE = "vesuvius_run.lock"
FORMAT = "vesuvius_monai.run/1"
PLAN_FILE = "plan.yaml"
POSTPROCESS_FILE = "postprocess.json"  # the choice of tune-postprocess (also in the folder of ``--out``)


@dataclass(frozen=True)
class RunDir:
    """The folder of one training run (``path``) and where each of its files lies."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @classmethod
    def of_checkpoint(cls, checkpoint: str | Path) -> RunDir:
        """The run folder of a checkpoint at ``<run>/checkpoints/<name>.pt``."""
        return cls(Path(checkpoint).parent.parent)

    # ----------------------------------------------------------------- layout

    @property
    def marker(self) -> Path:
        return self.path / MARKER

    @property
    def lock_file(self) -> Path:
        return self.path / LOCK_FILE

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def plan(self) -> Path:
        return self.path / PLAN_FILE

    @property
    def splits(self) -> Path:
        return self.path / "splits.json"

    @property
    def train_log(self) -> Path:
        return self.path / "train_log.csv"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def checkpoint(self, name: str) -> Path:
        """``checkpoints/<name>.pt`` (``last`` or ``best``)."""
        return self.checkpoints / f"{name}.pt"

    @property
    def last(self) -> Path:
        return self.checkpoint("last")

    @property
    def best(self) -> Path:
        return self.checkpoint("best")

    @property
    def cache(self) -> Path:
        return self.path / "cache"

    @property
    def learning_curve(self) -> Path:
        return self.path / "learning_curve.png"

    @property
    def postprocess(self) -> Path:
        return self.path / POSTPROCESS_FILE

    @property
    def eval(self) -> Path:
        return self.path / "eval"

    # ----------------------------------------------------------------- marker and rules

    def is_run(self) -> bool:
        """True when the folder holds this project's run marker (written first into every run folder)."""
        try:
            return json.loads(self.marker.read_text()).get("format") == FORMAT
        except (OSError, ValueError, AttributeError):
            return False

    def mark(self) -> None:
        """Write the marker into the folder (created if needed) unless it is there already."""
        if not self.is_run():  # a new folder, or a run made before markers existed
            write_text(self.marker, json.dumps({"format": FORMAT, "version": __version__,
                                                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=1))

    def check_new(self) -> None:
        """Raise unless a new run may start here: a new or empty folder, or one of our runs stopped before its first
        checkpoint (its config.yaml, splits.json and logs are then replaced)."""
        check_parents(self.path, "output_dir")
        if self.last.exists():
            raise VesuviusError(f"output_dir {self.path} already holds a run ({self.last}); pass --resume to "
                                f"continue it or set output_dir to a new folder")
        if self.path.exists() and not self.path.is_dir():
            raise VesuviusError(f"output_dir {self.path} is a file; set output_dir to a new folder")
        if self.is_run():
            if self.config.exists():
                log.warning("output_dir %s holds a run stopped before its first checkpoint: starting it again (its "
                            "config.yaml, splits.json and logs are replaced)", self.path)
        elif self.path.is_dir() and any(p.name != LOCK_FILE for p in self.path.iterdir()):
            raise VesuviusError(f"output_dir {self.path} is not empty and is not a vesuvius_monai run (no {MARKER}); "
                                f"nothing was changed there: set output_dir to a new or empty folder")

    def check_resumable(self) -> None:
        """Raise unless the folder holds a ``last.pt`` to resume from."""
        if not self.last.is_file():
            hint = (" (the run there stopped before its first checkpoint: train without --resume to start it again)"
                    if self.is_run() else "")
            raise VesuviusError(f"cannot resume: {self.last} does not exist{hint}")

    def start(self) -> RunDir:
        """Check that a new run may start here (:meth:`check_new`), then mark the folder as a run; returns self."""
        self.check_new()
        self.mark()
        return self

    # ----------------------------------------------------------------- one command at a time

    def lock(self, command: str) -> Lock:
        """The folder's lock for ``command`` ("train", "plan", ...): ``with run.lock("train"): ...`` makes the folder
        if needed and holds :data:`LOCK_FILE` in it; VesuviusError naming the holder while another process has it."""
        check_parents(self.path, "output_dir")
        if self.path.exists() and not self.path.is_dir():
            raise VesuviusError(f"output_dir {self.path} is a file; set output_dir to a new folder")
        return Lock(self.lock_file, f"run folder {self.path}", command)

    def checkpoint_leftovers(self) -> list[Path]:
        """Temporary files of checkpoint saves that never finished (a process killed while saving); only the holder of
        the folder's lock may remove them, since no other process can be saving then."""
        return sorted(p for name in ("last.pt", "best.pt") for p in self.checkpoints.glob(f".{name}.*.tmp.pt"))

    def discard(self) -> None:
        """Remove the run folder, made by this process, after its run failed before its first checkpoint. Only a folder
        holding nothing but the files a run writes is removed; anything else (or a checkpoint) leaves it as it is, with
        a warning. (The folder's lock, released next, removes the parents it made, when they are empty.)"""
        ours = {MARKER, LOCK_FILE, "config.yaml", PLAN_FILE, "splits.json", "train_log.csv", "tensorboard", "cache",
                "checkpoints"}
        others = [p.name for p in self.path.iterdir() if p.name not in ours] if self.path.is_dir() else []
        if others or self.last.exists() or self.best.exists():
            log.warning("%s holds %s: left as it is", self.path, others[0] if others else "a checkpoint")
            return
        shutil.rmtree(self.path, ignore_errors=True)
        log.info("removed %s, made by this run, which failed", self.path)
