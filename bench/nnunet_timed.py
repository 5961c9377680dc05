"""nnU-Net v2 trained for a wall-clock budget, then predicting a folder: the driver of ``bench_nnunet.py``.

Runs in nnU-Net's own environment (``bench/setup_nnunet.sh``), not the project's: it imports nnunetv2, not
vesuvius_monai. nnU-Net is used as it ships (its plans, network, loss, augmentation, SGD with momentum and its
poly learning-rate decay, deep supervision, mirrored test-time augmentation), with one change: training ends when
``--minutes`` of wall-clock time have passed, and the poly decay runs on the elapsed share of that time instead of
on epochs (``lr = initial_lr * (1 - elapsed / budget) ** 0.9`` before every step), so that a short run ends
annealed as a 1000-epoch run does. Validation (``--val-iterations`` batches per epoch of ``--iterations``
steps) counts against the budget, as it does for the project's runs; the epoch in which the time runs out ends
without it (nnU-Net's validation only logs and picks checkpoint_best). The final weights are used for prediction, as
nnU-Net's ``checkpoint_final.pth`` is by default.

Usage (the nnU-Net environment variables nnUNet_raw, nnUNet_preprocessed and nnUNet_results set, the dataset
planned and preprocessed)::

    .venv-nnunet/bin/python bench/nnunet_timed.py --dataset Dataset501_Bench --minutes 6 --seed 0 \
        --predict-in imagesTs --predict-out predictions --summary summary.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.paths import nnUNet_preprocessed
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class TimedTrainer(nnUNetTrainer):
    """nnUNetTrainer whose training ends after ``budget_s`` seconds, its poly decay running on elapsed time."""

    budget_s = 360.0
    iterations = 25
    val_iterations = 5

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cpu")):
        # nnUNetTrainer records its own __init__ arguments by name, so they are spelled out here
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_iterations_per_epoch = self.iterations
        self.num_val_iterations_per_epoch = self.val_iterations
        self.steps = 0
        self.train_seconds = 0.0

    def _set_lr(self, fraction: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.initial_lr * (1.0 - fraction) ** 0.9

    def run_training(self) -> None:
        """nnUNetTrainer.run_training with the epoch loop cut by the clock (started after the set-up)."""
        self.on_train_start()
        start = time.perf_counter()
        done = False
        while not done:
            self.on_epoch_start()
            self.on_train_epoch_start()
            outputs = []
            for _ in range(self.num_iterations_per_epoch):
                fraction = (time.perf_counter() - start) / self.budget_s
                if fraction >= 1.0:
                    done = True
                    break
                self._set_lr(fraction)
                outputs.append(self.train_step(next(self.dataloader_train)))
                self.steps += 1
            if outputs:
                self.on_train_epoch_end(outputs)
            if done:  # its validation and epoch-end logging only log (the final weights are used): skipped
                self.current_epoch += 1  # as on_epoch_end counts it, for on_train_end
                break
            with torch.no_grad():
                self.on_validation_epoch_start()
                val = [self.validation_step(next(self.dataloader_val))
                       for _ in range(self.num_val_iterations_per_epoch)]
                self.on_validation_epoch_end(val)
            self.on_epoch_end()
        self.train_seconds = time.perf_counter() - start
        self.on_train_end()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", required=True, help="nnU-Net dataset name, e.g. Dataset501_Bench")
    parser.add_argument("--configuration", default="3d_fullres")
    parser.add_argument("--plans", default="nnUNetPlans", help="plans identifier written by the planner")
    parser.add_argument("--minutes", type=float, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--iterations", type=int, default=25, help="training steps per epoch (nnU-Net: 250)")
    parser.add_argument("--val-iterations", type=int, default=5, help="validation batches per epoch (nnU-Net: 50)")
    parser.add_argument("--predict-in", type=Path, required=True, help="folder of <case>_0000.nii.gz to predict")
    parser.add_argument("--predict-out", type=Path, required=True)
    parser.add_argument("--no-mirroring", action="store_true", help="predict without nnU-Net's mirrored TTA")
    parser.add_argument("--summary", type=Path, required=True, help="JSON of steps, seconds and the plan used")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(os.cpu_count() or 1)
    folder = Path(nnUNet_preprocessed) / args.dataset
    plans = load_json(str(folder / f"{args.plans}.json"))
    plans["continue_training"] = False  # as nnU-Net's get_trainer_from_args sets it for a fresh run
    dataset_json = load_json(str(folder / "dataset.json"))
    TimedTrainer.budget_s = args.minutes * 60.0
    TimedTrainer.iterations, TimedTrainer.val_iterations = args.iterations, args.val_iterations
    trainer = TimedTrainer(plans, args.configuration, 0, dataset_json, device=torch.device("cpu"))
    trainer.run_training()

    start = time.perf_counter()
    trainer.set_deep_supervision_enabled(False)  # as nnUNetTrainer.perform_actual_validation does
    trainer.network.eval()
    predictor = nnUNetPredictor(use_mirroring=not args.no_mirroring, device=torch.device("cpu"), allow_tqdm=False)
    predictor.manual_initialization(trainer.network, trainer.plans_manager, trainer.configuration_manager,
                                    [trainer.network.state_dict()], trainer.dataset_json,
                                    type(trainer).__name__, trainer.inference_allowed_mirroring_axes)
    predictor.predict_from_files(str(args.predict_in), str(args.predict_out), save_probabilities=False,
                                 overwrite=True, num_processes_preprocessing=1, num_processes_segmentation_export=1)
    config = trainer.configuration_manager
    summary = {"steps": trainer.steps, "train_seconds": trainer.train_seconds, "epochs": trainer.current_epoch,
               "predict_seconds": time.perf_counter() - start, "patch_size": list(config.patch_size),
               "batch_size": config.batch_size, "features_per_stage": list(config.network_arch_init_kwargs.get(
                   "features_per_stage", [])), "spacing": list(config.spacing), "mirroring": not args.no_mirroring,
               "torch_threads": torch.get_num_threads(), "seed": args.seed, "minutes": args.minutes}
    tmp = args.summary.with_name(args.summary.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(args.summary)  # whole or not at all: the bench reads it as the mark of a finished run


if __name__ == "__main__":
    main()
