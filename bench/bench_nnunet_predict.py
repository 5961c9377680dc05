"""nnU-Net's predictor beside this project's engine on the same nnU-Net v2 model folder: agreement, time, memory.

A model folder in nnU-Net's layout (``nnUNetTrainer__nnUNetPlans__3d_fullres/`` with plans.json, dataset.json and
``fold_0/checkpoint_final.pth``) is written with random weights (seeded): ``--plan default`` is nnU-Net's default
3d_fullres U-Net (patch 128^3, 6 stages, 32-320 features), ``--plan tiny`` a 3-stage one with 32^3 patches for CPU
checks, ``--plan narrow`` the default's 128^3 patch (so the same windows) on a 3-stage network of 4-16 features: the
320^3 / 512^3 time and memory on a CPU. Random weights are enough for agreement: both sides run the same network
on the same windows. For each ``--sizes`` n, a volume n^3 (uint8 noise, no zero voxel so nnU-Net's crop to the
nonzero region keeps it whole) is predicted

* by ``nnUNetPredictor`` (in ``.venv-nnunet``, ``bash bench/setup_nnunet.sh``): ``predict_single_npy_array`` with
  tile_step_size 0.5, Gaussian blending and mirroring (``--no-mirroring``: none), the whole volume in memory;
* by ``vesuvius-monai predict`` into a float32 ``.zarr`` (block-wise), the same folder as ``--checkpoint``.

Each side runs in its own process (peak host RSS from ``getrusage``, peak GPU memory from
``torch.cuda.max_memory_allocated``); the foreground probabilities are compared voxel by voxel (max and mean
absolute difference). The window grids coincide when (n - patch) is a multiple of patch / 2 (as for 320 and 512 with
the default plan's 128). By default the project reproduces nnUNetPredictor (nnU-Net's window starts,
its Gaussian, logit blending with one softmax at the end: ``infer.grid=nnunet``, ``infer.blend=nnunet``,
``infer.blend_space=logit``); what remains is nnU-Net's float16 sums of the weighted logits and weights, which near
the volume's edges and corners (where only a window's tails reach, weights ~1e-10 of the peak) leave a few bits of
precision (``--nnunet-fp32`` sums in float32 instead, to tell the causes apart).The
difference is printed over the whole volume and beyond a quarter patch of its faces.

Usage::

    bash bench/setup_nnunet.sh
    PYTHONPATH=. .venv/bin/python bench/bench_nnunet_predict.py --sizes 320 512 --device cuda
    PYTHONPATH=. .venv/bin/python bench/bench_nnunet_predict.py --plan tiny --sizes 64 80 --device cpu
    PYTHONPATH=. .venv/bin/python bench/bench_nnunet_predict.py --plan narrow --sizes 320 512 --device cpu \
        --no-mirroring --out-dir runs/nnunet_predict_narrow
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

FOLDER = "nnUNetTrainer__nnUNetPlans__3d_fullres"
PLANS = {
    "default": {"patch": [128, 128, 128], "features": [32, 64, 128, 256, 320, 320],
                "strides": [[1, 1, 1]] + [[2, 2, 2]] * 5, "convs": 2},
    "tiny": {"patch": [32, 32, 32], "features": [8, 16, 32], "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
             "convs": 2},
    "narrow": {"patch": [128, 128, 128], "features": [4, 8, 16], "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
               "convs": 2},
}
CT = {"max": 255.0, "mean": 128.0, "median": 128.0, "min": 1.0, "percentile_00_5": 3.0, "percentile_99_5": 252.0,
      "std": 70.0}


def arch_kwargs(plan: str) -> dict:
    spec, stages = PLANS[plan], len(PLANS[plan]["features"])
    return {"n_stages": stages, "features_per_stage": spec["features"], "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [[3, 3, 3]] * stages, "strides": spec["strides"],
            "n_conv_per_stage": [spec["convs"]] * stages, "n_conv_per_stage_decoder": [spec["convs"]] * (stages - 1),
            "conv_bias": True, "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}


def plans_json(plan: str) -> dict:
    """A plans.json as nnU-Net's ExperimentPlanner writes it (one 3d_fullres configuration, spacing 1)."""
    resample = {"resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
                "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
                "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                       "force_separate_z": None}}
    config = {"data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
              "batch_size": 2, "patch_size": PLANS[plan]["patch"], "median_image_size_in_voxels": [256, 256, 256],
              "spacing": [1.0, 1.0, 1.0], "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
              **resample, "architecture": {
                  "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                  "arch_kwargs": arch_kwargs(plan), "_kw_requires_import": ["conv_op", "norm_op", "dropout_op",
                                                                              "nonlin"]},
              "batch_dice": False}
    return {"dataset_name": "Dataset999_Bench", "plans_name": "nnUNetPlans",
            "original_median_spacing_after_transp": [1.0, 1.0, 1.0],
            "original_median_shape_after_transp": [256, 256, 256], "image_reader_writer": "NibabelIO",
            "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2], "configurations": {"3d_fullres": config},
            "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel": {"0": CT}}


def write_model(root: Path, plan: str, seed: int = 0) -> Path:
    """The model folder with random weights (seeded), saved as nnUNetTrainer.save_checkpoint saves."""
    import torch
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from torch import nn

    folder = root / FOLDER
    if (folder / "fold_0" / "checkpoint_final.pth").is_file():
        if json.loads((folder / "plans.json").read_text()) != plans_json(plan):
            raise SystemExit(f"{folder} holds a model of another plan than --plan {plan}: choose another --out-dir")
        return folder
    (folder / "fold_0").mkdir(parents=True, exist_ok=True)
    plans = plans_json(plan)
    data = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "surface": 1}, "numTraining": 1,
            "file_ending": ".nii.gz"}
    torch.manual_seed(seed)
    kwargs = dict(copy.deepcopy(arch_kwargs(plan)), conv_op=nn.Conv3d, norm_op=nn.InstanceNorm3d, nonlin=nn.LeakyReLU)
    net = PlainConvUNet(input_channels=1, num_classes=2, deep_supervision=True, **kwargs)
    payload = {"network_weights": net.state_dict(), "optimizer_state": {}, "grad_scaler_state": None,
               "logging": {}, "_best_ema": None, "current_epoch": 0,
               "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0, "dataset_json": data,
                             "device": torch.device("cpu")},
               "trainer_name": "nnUNetTrainer", "inference_allowed_mirroring_axes": (0, 1, 2)}
    torch.save(payload, folder / "fold_0" / "checkpoint_final.pth")
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    (folder / "dataset.json").write_text(json.dumps(data, indent=2))
    return folder


def peak() -> dict:
    """Peak host RSS (GiB) of this process and peak GPU memory allocated by torch (GiB, 0 without CUDA)."""
    import torch

    gpu = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    return {"host_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "gpu_gib": gpu}


def worker_nnunet(args: argparse.Namespace) -> dict:
    """In .venv-nnunet: nnUNetPredictor on the whole volume; writes the foreground probabilities as .npy."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    device = torch.device(args.device)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=not args.no_mirroring,
                                perform_everything_on_device=device.type == "cuda", device=device, verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(args.model), use_folds=(0,),
                                                   checkpoint_name="checkpoint_final.pth")
    image = np.load(args.volume).astype(np.float32)[None]
    start = time.perf_counter()
    with float32_sums() if args.nnunet_fp32 else contextlib.nullcontext():
        _, probs = predictor.predict_single_npy_array(image, {"spacing": [1.0, 1.0, 1.0]}, None, None, True)
    seconds = time.perf_counter() - start
    np.save(args.result, np.asarray(probs[1], dtype=np.float32))
    return {"seconds": seconds, **peak()}


@contextlib.contextmanager
def float32_sums():
    """nnU-Net's sliding window with its sums and Gaussian in float32 instead of float16 (a diagnostic: its code
    names ``torch.half`` when it allocates the sums, and its Gaussian's dtype defaults to float16)."""
    import torch
    from nnunetv2.inference import predict_from_raw_data as module

    half, gaussian = torch.half, module.compute_gaussian
    torch.half = torch.float32
    module.compute_gaussian = lambda *a, **k: gaussian(*a, **{**k, "dtype": torch.float32})
    try:
        yield
    finally:
        torch.half, module.compute_gaussian = half, gaussian


def worker_project(args: argparse.Namespace) -> dict:
    """In the project's environment: ``vesuvius-monai predict`` into a float32 Zarr, block-wise."""
    from vesuvius_monai.cli import main

    argv = ["predict", "--checkpoint", str(args.model), "--input", str(args.volume), "--output", str(args.result),
            "infer.out_dtype=float32", f"infer.device={args.device}", "infer.block_size=[256,256,256]"]
    if args.no_mirroring:
        argv.append("infer.tta_flip_axes=[]")
    start = time.perf_counter()
    if main(argv) != 0:
        raise SystemExit("vesuvius-monai predict failed")
    return {"seconds": time.perf_counter() - start, **peak()}


def run_side(python: str, side: str, args: argparse.Namespace, volume: Path, result: Path) -> dict:
    command = [python, __file__, "--worker", side, "--model", str(args.model), "--volume", str(volume),
               "--result", str(result), "--device", args.device] + (["--no-mirroring"] if args.no_mirroring else []) \
        + (["--nnunet-fp32"] if args.nnunet_fp32 else [])
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{side} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> None:
    from vesuvius_monai.data.readers import open_volume

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    args.model = write_model(out, args.plan)
    rows = []
    for n in args.sizes:
        volume = out / f"volume_{n}.npy"
        if not volume.is_file():
            np.save(volume, np.random.default_rng(n).integers(1, 256, (n, n, n), dtype=np.uint8))
        theirs = run_side(args.python, "nnunet", args, volume, out / f"nnunet_{n}.npy")
        ours = run_side(sys.executable, "project", args, volume, out / f"project_{n}.zarr")
        diff = np.abs(open_volume(out / f"project_{n}.zarr").read() - np.load(out / f"nnunet_{n}.npy"))
        m = PLANS[args.plan]["patch"][0] // 4
        inner = diff[m:n - m, m:n - m, m:n - m]
        rows.append({"size": n, "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
                     "inner_margin": m, "inner_max_abs_diff": float(inner.max()), "nnunet": theirs, "project": ours})
        print(f"{n}^3: max |p_project - p_nnunet| = {diff.max():.2e} (mean {diff.mean():.2e}; "
              f"{inner.max():.2e} beyond {m} voxels of the faces); "
              f"nnUNetPredictor {theirs['seconds']:.1f} s, host {theirs['host_gib']:.2f} GiB, "
              f"GPU {theirs['gpu_gib']:.2f} GiB; vesuvius-monai {ours['seconds']:.1f} s, "
              f"host {ours['host_gib']:.2f} GiB, GPU {ours['gpu_gib']:.2f} GiB", flush=True)
    (out / "results.json").write_text(json.dumps({"plan": args.plan, "device": args.device,
                                                  "nnunet_fp32": args.nnunet_fp32,
                                                  "mirroring": not args.no_mirroring, "rows": rows}, indent=2))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[320, 512])
    parser.add_argument("--plan", choices=sorted(PLANS), default="default")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--no-mirroring", action="store_true")
    parser.add_argument("--nnunet-fp32", action="store_true",
                        help="nnU-Net's sums and Gaussian in float32, not its float16 (diagnostic)")
    parser.add_argument("--python", default=".venv-nnunet/bin/python", help="the nnU-Net environment's python")
    parser.add_argument("--out-dir", default="runs/nnunet_predict")
    parser.add_argument("--worker", choices=["nnunet", "project"], help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--volume", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps((worker_nnunet if args.worker == "nnunet" else worker_project)(args)))
    else:
        run(args)


if __name__ == "__main__":
    main()
