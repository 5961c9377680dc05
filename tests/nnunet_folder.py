"""Writes nnU-Net v2 trained-model folders for tests, as nnU-Net lays them out (no nnU-Net needed): plans.json,
dataset.json and fold_<f>/checkpoint_final.pth holding what nnUNetTrainer.save_checkpoint writes, with random
weights of a tiny network built by dynamic-network-architectures."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn

FOLDER = "nnUNetTrainer__nnUNetPlans__3d_fullres"
PATCH = (16, 16, 16)
ARCH_KWARGS = {"n_stages": 3, "features_per_stage": [4, 8, 16], "conv_op": "torch.nn.modules.conv.Conv3d",
               "kernel_sizes": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
               "n_conv_per_stage": [1, 1, 1], "n_conv_per_stage_decoder": [1, 1], "conv_bias": True,
               "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
               "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
               "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}
CT_PROPS = {"max": 240.0, "mean": 120.0, "median": 118.0, "min": 3.0, "percentile_00_5": 20.0,
            "percentile_99_5": 220.0, "std": 40.0}


def plans(spacing=(2.0, 1.0, 1.0), normalization="CTNormalization", patch=PATCH) -> dict:
    """A plans.json of one 3d_fullres configuration of the tiny network."""
    config = {"data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
              "batch_size": 2, "patch_size": list(patch), "median_image_size_in_voxels": [64, 64, 64],
              "spacing": list(spacing), "normalization_schemes": [normalization], "use_mask_for_norm": [False],
              "resampling_fn_data": "resample_data_or_seg_to_shape",
              "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                               "arch_kwargs": copy.deepcopy(ARCH_KWARGS),
                               "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
              "batch_dice": True}
    return {"dataset_name": "Dataset001_Surface", "plans_name": "nnUNetPlans", "original_median_spacing_after_"
            "transp": list(spacing), "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2],
            "transpose_backward": [0, 1, 2], "configurations": {"3d_fullres": config},
            "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel": {"0": CT_PROPS}}


def dataset(labels=None) -> dict:
    return {"channel_names": {"0": "CT"}, "labels": labels or {"background": 0, "surface": 1},
            "numTraining": 10, "file_ending": ".nii.gz"}


def network(num_classes: int = 2, seed: int = 0) -> nn.Module:
    """The tiny network of :data:`ARCH_KWARGS` with random weights (instance norms given random affines too)."""
    torch.manual_seed(seed)
    kwargs = dict(ARCH_KWARGS, conv_op=nn.Conv3d, norm_op=nn.InstanceNorm3d, nonlin=nn.LeakyReLU)
    net = PlainConvUNet(input_channels=1, num_classes=num_classes, deep_supervision=True, **kwargs)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return net.eval()


def checkpoint_payload(net: nn.Module, plan: dict, data: dict, fold, mirror_axes=(0, 1, 2)) -> dict:
    """What nnUNetTrainer.save_checkpoint writes (numpy scalars in its log, a torch.device in init_args)."""
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    return {"network_weights": net.state_dict(), "optimizer_state": optimizer.state_dict(),
            "grad_scaler_state": None,
            "logging": {"mean_fg_dice": [np.float64(0.5)], "ema_fg_dice": [np.float64(0.5)],
                        "train_losses": [np.float64(-0.3)], "val_losses": [np.float32(-0.2)], "lrs": [0.01],
                        "epoch_start_timestamps": [1.7e9], "epoch_end_timestamps": [1.7e9 + 60],
                        "dice_per_class_or_region": [[np.float64(0.5)]]},
            "_best_ema": np.float64(0.5), "current_epoch": 1,
            "init_args": {"plans": plan, "configuration": "3d_fullres", "fold": fold, "dataset_json": data,
                          "device": torch.device("cpu")},
            "trainer_name": "nnUNetTrainer", "inference_allowed_mirroring_axes": tuple(mirror_axes)}


def write_folder(root: Path, folds=(0,), plan: dict | None = None, data: dict | None = None,
                 mirror_axes=(0, 1, 2), name: str = "checkpoint_final.pth") -> tuple[Path, dict]:
    """An nnU-Net folder under ``root``; returns (folder, {fold: its network, deep supervision on})."""
    plan, data = plan or plans(), data or dataset()
    folder = root / FOLDER
    folder.mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plan, indent=2))
    (folder / "dataset.json").write_text(json.dumps(data, indent=2))
    nets = {}
    for fold in folds:
        nets[fold] = network(len(data["labels"]), seed=int(fold) if str(fold).isdigit() else 99)
        (folder / f"fold_{fold}").mkdir()
        torch.save(checkpoint_payload(nets[fold], plan, data, fold, mirror_axes), folder / f"fold_{fold}" / name)
    return folder, nets
