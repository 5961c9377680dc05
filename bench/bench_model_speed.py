"""resunet3d speed: forward inference throughput and AdamW training-step time.

For each ``init_features:ZxYxX`` setting: build the model, then
  * inference: ``--reps`` timed forward passes in eval mode under ``torch.inference_mode`` after one
    warm-up pass; prints the median seconds per pass and the throughput in Mvox/s
    (batch * Z * Y * X / median seconds / 1e6);
  * training: ``--steps`` timed steps (forward + DiceLoss(sigmoid) + backward + AdamW step) after
    one warm-up step; prints the median seconds per step and its throughput.
Every printed figure is followed by the number of passes/steps it came from.

Example::

    python bench/bench_model_speed.py --threads 1 2 --batch 2 --settings 8:48x48x48 16:32x128x128

With several ``--threads`` values each setting is measured at every thread count side by side.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from monai.losses import DiceLoss

from vesuvius_monai.models import build_model


def parse_setting(text: str) -> tuple[int, tuple[int, int, int]]:
    """'16:32x128x128' -> (16, (32, 128, 128))."""
    features, patch = text.split(":")
    z, y, x = (int(v) for v in patch.lower().split("x"))
    return int(features), (z, y, x)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", nargs="+", default=["8:32x64x64", "16:32x64x64", "16:32x128x128"],
                        help="init_features:ZxYxX, one per setting")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, nargs="+", default=[2], help="torch.set_num_threads values to compare")
    parser.add_argument("--reps", type=int, default=3, help="timed forward passes per setting")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per setting")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in training")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args()


def timed(fn, count: int, device: torch.device) -> list[float]:
    """Run ``fn`` once untimed, then ``count`` times timed; returns seconds per call."""
    fn()
    seconds = []
    for _ in range(count):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def bench_setting(features: int, patch: tuple[int, int, int], args: argparse.Namespace) -> None:
    """Print inference and training figures for one (init_features, patch) setting."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model("resunet3d", init_features=features, checkpointing=args.checkpointing).to(device)
    x = torch.randn(args.batch, 1, *patch, device=device)
    y = (torch.rand_like(x) > 0.5).float()
    voxels = x.numel()

    model.eval()

    def forward() -> None:
        with torch.inference_mode():
            model(x)

    fwd = statistics.median(timed(forward, args.reps, device))

    model.train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = DiceLoss(sigmoid=True)

    def train_step() -> None:
        optimiser.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimiser.step()

    step = statistics.median(timed(train_step, args.steps, device))
    label = f"f={features:<3d} patch={args.batch}x1x{'x'.join(map(str, patch))} threads={torch.get_num_threads()}"
    print(f"{label}  inference {fwd:.3f} s/pass = {voxels / fwd / 1e6:.2f} Mvox/s (median of {args.reps} passes)"
          f"  |  training {step:.3f} s/step = {voxels / step / 1e6:.2f} Mvox/s (median of {args.steps} steps)",
          flush=True)


def main() -> None:
    args = parse_args()
    print(f"resunet3d, device={args.device}, threads={args.threads}, batch={args.batch}, "
          f"checkpointing={args.checkpointing}, one warm-up pass/step before timing")
    for text in args.settings:
        features, patch = parse_setting(text)
        for threads in args.threads:
            torch.set_num_threads(threads)
            bench_setting(features, patch, args)


if __name__ == "__main__":
    main()
