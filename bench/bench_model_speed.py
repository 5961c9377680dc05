"""resunet3d speed: forward inference throughput, and AdamW training steps with ``train.channels_last`` off and on.

For each ``init_features:ZxYxX[:key=N,...]`` setting (the optional part: more integer model kwargs, e.g.
``depth=3,stem_stride=2``) and each ``--threads`` value:
  * inference: ``--reps`` timed forward passes of the plain (contiguous) model in eval mode under
    ``torch.inference_mode`` after one warm-up pass: median seconds per pass and throughput in Mvox/s
    (batch * Z * Y * X / median seconds / 1e6);
  * training: two models built by the trainer's own ``build_state`` from the same seed, one with
    ``train.channels_last`` false and one with it true (model and batch in ``torch.channels_last_3d``, as the
    trainer's step does), each given one warm-up step, then ``--steps`` rounds of one timed step of each,
    interleaved (off, on, off, on, ...) so that a change in the machine's load hits both: the median seconds per
    step of each, their ratio off / on (> 1: channels-last is faster), and a paired verdict over the rounds.
A step is forward + the config's loss (``train.loss``; Dice + BCE in configs/demo.yaml) + backward + AdamW step.
Every figure is printed with the number of passes / steps it came from.

Example::

    python bench/bench_model_speed.py --threads 1 2 --batch 2 --settings 8:48x48x48 16:32x128x128
    python bench/bench_model_speed.py --settings 8:64x64x64:depth=4 8:64x64x64:depth=3,stem_stride=2
    python bench/bench_model_speed.py --settings 4:16x16x16 --batch 1 --reps 1 --steps 1 --threads 1   # seconds

With several ``--threads`` values each setting is measured at every thread count side by side.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics

import torch

from _common import (format_table, run_main, timed_call, verdict_rule, verdict_text,
                     write_json)
from vesuvius_monai.config import Config, load_config, to_dict
from vesuvius_monai.engine.trainer import build_state
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.losses import build_loss

log = logging.getLogger("bench_model_speed")

COLUMNS = [("infer_s", "infer s/pass", ".3f"), ("infer_mvox_s", "infer Mvox/s", ".2f"), ("reps", "passes", "d"),
           ("off_s", "train off s/step", ".3f"), ("on_s", "train on s/step", ".3f"),
           ("ratio", "off/on", ".2f"), ("steps", "steps", "d")]


def parse_setting(text: str) -> tuple[int, tuple[int, int, int], dict[str, int]]:
    """'16:32x128x128' -> (16, (32, 128, 128), {}); '8:64x64x64:depth=3,stem_stride=2' adds integer model kwargs."""
    try:
        features, patch, *rest = text.split(":")
        z, y, x = (int(v) for v in patch.lower().split("x"))
        extra = dict(item.split("=") for item in rest[0].split(",")) if rest else {}
        if len(rest) > 1:
            raise ValueError
        return int(features), (z, y, x), {k: int(v) for k, v in extra.items()}
    except ValueError:
        raise VesuviusError(f"--settings {text!r}: expected init_features:ZxYxX[:key=N,...], e.g. 16:32x128x128 or "
                            f"8:64x64x64:depth=3,stem_stride=2") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml", help="YAML config: the loss, lr and weight decay")
    parser.add_argument("--settings", nargs="+", default=["8:32x64x64", "16:32x64x64", "16:32x128x128"],
                        help="init_features:ZxYxX, one per setting")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, nargs="+", default=[2], help="torch.set_num_threads values to compare")
    parser.add_argument("--reps", type=int, default=3, help="timed forward passes per setting")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per setting and channels_last mode")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in training")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="also write the figures to this JSON file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=0.001")
    return parser.parse_args(argv)


def setting_config(args: argparse.Namespace, features: int, channels_last: bool, extra: dict[str, int] | None = None
                   ) -> Config:
    """The config of one training mode: ``--config`` + overrides, this setting's model and ``train.channels_last``."""
    kwargs = {"init_features": features, "checkpointing": args.checkpointing, **(extra or {})}
    return load_config(args.config, [*args.overrides, "model.name=resunet3d", f"model.kwargs={json.dumps(kwargs)}",
                                        f"train.channels_last={str(channels_last).lower()}"])


def inference_seconds(cfg: Config, x: torch.Tensor, reps: int, device: torch.device) -> list[float]:
    """Seconds of ``reps`` forward passes of the plain model (after one warm-up pass)."""
    model = build_state(cfg, device).model.eval()

    def forward() -> None:
        with torch.inference_mode():
            model(x)

    forward()
    return [timed_call(forward, device) for _ in range(reps)]


def training_seconds(cfgs: dict[str, Config], x: torch.Tensor, y: torch.Tensor, steps: int, device: torch.device
                     ) -> dict[str, list[float]]:
    """Seconds per training step of each config (``{mode: cfg}``), measured in interleaved rounds after a warm-up."""
    runs = {}
    for mode, cfg in cfgs.items():
        state = build_state(cfg, device)  # seeded by cfg.seed: both modes start from the same weights
        image = x.contiguous(memory_format=torch.channels_last_3d) if cfg.train.channels_last else x
        runs[mode] = (state, image, build_loss(cfg.train.loss, ignore_index=cfg.data.ignore_index))

    def step(mode: str) -> None:
        state, image, loss_fn = runs[mode]
        state.model.train()
        state.optimizer.zero_grad(set_to_none=True)
        loss_fn(state.model(image).float(), y).backward()
        state.optimizer.step()

    for mode in runs:
        step(mode)  # warm-up
    seconds: dict[str, list[float]] = {mode: [] for mode in runs}
    for _ in range(steps):
        for mode in runs:
            seconds[mode].append(timed_call(lambda: step(mode), device))
    return seconds


def bench_setting(features: int, patch: tuple[int, int, int], extra: dict[str, int], args: argparse.Namespace
                  ) -> tuple[str, dict, str]:
    """(row name, figures, verdict line) of one (init_features, patch, model kwargs) setting at the current thread
    count."""
    device = torch.device(args.device)
    cfgs = {"off": setting_config(args, features, False, extra), "on": setting_config(args, features, True, extra)}
    torch.manual_seed(0)
    x = torch.randn(args.batch, 1, *patch, device=device)
    y = (torch.rand_like(x) > 0.5).float()
    voxels = x.numel()
    infer = statistics.median(inference_seconds(cfgs["off"], x, args.reps, device))
    train = training_seconds(cfgs, x, y, args.steps, device)
    off, on = statistics.median(train["off"]), statistics.median(train["on"])
    kwargs = "".join(f" {k}={v}" for k, v in extra.items())
    name = f"f={features}{kwargs} {args.batch}x1x{'x'.join(map(str, patch))} t={torch.get_num_threads()}"
    row = {"features": features, "model_kwargs": extra, "patch": list(patch), "batch": args.batch,
           "threads": torch.get_num_threads(),
           "infer_s": infer, "infer_mvox_s": voxels / infer / 1e6, "reps": args.reps, "off_s": off, "on_s": on,
           "ratio": off / on, "steps": args.steps, "off_steps_s": train["off"], "on_steps_s": train["on"]}
    rounds = range(args.steps)
    verdict = verdict_text("s/step", dict(zip(rounds, train["off"])), dict(zip(rounds, train["on"])), 0.0,
                           unit="round", lower_is_better=True, spec="+.3f")
    log.info("%s: inference %.3f s/pass, training off %.3f / on %.3f s/step", name, infer, off, on)
    return name, row, f"{name}: channels_last on vs off: {verdict}"


def run(args: argparse.Namespace) -> None:
    if min(args.reps, args.steps, args.batch) < 1:
        raise VesuviusError("--reps, --steps and --batch must be >= 1")
    settings = [parse_setting(text) for text in args.settings]
    rows, lines = {}, []
    for features, patch, extra in settings:
        for threads in args.threads:
            torch.set_num_threads(threads)
            name, row, line = bench_setting(features, patch, extra, args)
            rows[name] = row
            lines.append(line)
    print(f"resunet3d, device={args.device}, batch={args.batch}, checkpointing={args.checkpointing}; one warm-up "
          f"pass / step before timing; inference: median of 'passes' passes (contiguous model); training: medians of "
          f"'steps' interleaved steps with train.channels_last off and on, off/on = ratio of the medians (> 1: "
          f"channels-last faster)")
    print(format_table(rows, COLUMNS, row_header="setting"))
    print(verdict_rule("round", "0") + " (deltas in s/step, lower is better)")
    for line in lines:
        print(line)
    if args.out:
        write_json(args.out, {"device": args.device, "batch": args.batch, "checkpointing": args.checkpointing,
                              "config": to_dict(setting_config(args, settings[0][0], True, settings[0][2])),
                              "settings": rows, "verdicts": lines})


def main(argv: list[str] | None = None) -> None:
    run_main(parse_args, run, argv)


if __name__ == "__main__":
    main()
