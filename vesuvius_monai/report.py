"""Pictures for people: learning curves and orthogonal mid-slices with the prediction over the image."""

from __future__ import annotations

import base64
import csv
import html
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from vesuvius_monai.io.atomic import atomic_path, write_text  # noqa: E402
from vesuvius_monai.metrics.components import label_components  # noqa: E402

log = logging.getLogger(__name__)


def _save(fig: plt.Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png")
    plt.close(fig)


def read_train_log(csv_path: Path) -> dict[str, np.ndarray]:
    """Columns of ``train_log.csv`` as float arrays (NaN where a row has no value)."""
    with Path(csv_path).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    keys = rows[0].keys() if rows else []
    return {k: np.array([float(r[k]) if r[k] not in ("", None) else np.nan for r in rows]) for k in keys}


def plot_learning_curve(csv_path: Path, png_path: Path) -> None:
    """Training loss and validation Dice against step."""
    if not Path(csv_path).exists():
        log.warning("no %s: no learning curve drawn", csv_path)
        return
    cols = read_train_log(csv_path)
    if not len(cols.get("step", [])):
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(cols["step"], cols["loss"], color="tab:blue", label="training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss", color="tab:blue")
    val = ~np.isnan(cols["val_dice"])
    if val.any():
        ax2 = ax.twinx()
        ax2.plot(cols["step"][val], cols["val_dice"][val], "o-", color="tab:orange", label="validation Dice")
        ax2.set_ylabel("validation Dice", color="tab:orange")
        ax2.set_ylim(0, 1)
    ax.set_title("learning curve")
    _save(fig, Path(png_path))


def _mid_slices(volume: np.ndarray) -> list[np.ndarray]:
    z, y, x = (s // 2 for s in volume.shape)
    return [volume[z], volume[:, y], volume[:, :, x]]


def save_slices_png(image: np.ndarray, pred: np.ndarray, png_path: Path, *, label: np.ndarray | None = None,
                    ignore_index: int = 2, title: str = "") -> None:
    """Orthogonal mid-slices (z, y, x planes) of ``image`` with the prediction over it.

    With a label, a second row colours errors: green true positive, red false positive, blue false negative,
    grey the ignore region. All arrays (Z, Y, X).
    """
    rows = 2 if label is not None else 1
    fig, axes = plt.subplots(rows, 3, figsize=(12, 4 * rows), squeeze=False)
    names = ["axial (z)", "coronal (y)", "sagittal (x)"]
    for col, (img, prd) in enumerate(zip(_mid_slices(image), _mid_slices(pred.astype(bool)))):
        ax = axes[0, col]
        ax.imshow(img, cmap="gray")
        ax.imshow(np.ma.masked_where(~prd, prd), cmap="autumn", alpha=0.45, vmin=0, vmax=1)
        ax.set_title(f"{names[col]}: prediction")
        ax.axis("off")
    if label is not None:
        for col, (img, prd, lab) in enumerate(zip(_mid_slices(image), _mid_slices(pred.astype(bool)),
                                                   _mid_slices(label))):
            rgb = np.zeros(img.shape + (3,))
            rgb[prd & (lab == 1)] = (0, 0.8, 0)
            rgb[prd & (lab == 0)] = (1, 0, 0)
            rgb[~prd & (lab == 1)] = (0.2, 0.4, 1)
            rgb[lab == ignore_index] = (0.5, 0.5, 0.5)
            ax = axes[1, col]
            ax.imshow(img, cmap="gray")
            ax.imshow(rgb, alpha=0.5)
            ax.set_title(f"{names[col]}: TP green, FP red, FN blue")
            ax.axis("off")
    if title:
        fig.suptitle(title)
    _save(fig, Path(png_path))


def component_sizes(mask: np.ndarray, connectivity: int = 26) -> np.ndarray:
    """Voxel counts of the connected components of a binary (Z, Y, X) mask (``connectivity`` 6, 18 or 26)."""
    labels, n = label_components(mask, connectivity)
    return np.bincount(labels.ravel())[1:] if n else np.zeros(0, dtype=np.int64)


def save_component_histogram(pred_sizes: list[np.ndarray], label_sizes: list[np.ndarray], png_path: Path) -> None:
    """Histogram (log-spaced bins) of component sizes of predictions and labels over all fragments."""
    pred = np.concatenate(pred_sizes) if pred_sizes else np.zeros(0)
    label = np.concatenate(label_sizes) if label_sizes else np.zeros(0)
    top = max(pred.max(initial=1), label.max(initial=1))
    bins = np.logspace(0, np.log10(top) + 0.1, 30)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist([label, pred], bins=bins, label=[f"label ({len(label)} components)", f"prediction ({len(pred)})"],
            color=["tab:blue", "tab:orange"])
    ax.set_xscale("log")
    ax.set_xlabel("component size (voxels, 26-connected)")
    ax.set_ylabel("components")
    ax.legend()
    ax.set_title("connected-component sizes")
    _save(fig, Path(png_path))


def _png_tag(path: Path, caption: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<figure><img src="data:image/png;base64,{data}"><figcaption>{caption}</figcaption></figure>'


def write_html_report(path: Path, *, title: str, per_fragment: dict[str, dict], mean: dict[str, float],
                      figures: list[tuple[Path, str]], notes: list[str] = ()) -> None:
    """One self-contained HTML page: metric table (fragments + mean), notes, and embedded PNG figures."""
    names = list(mean)
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    rows = "".join(
        f"<tr><td>{html.escape(fid)}</td>" + "".join(f"<td>{s[n]:.4f}</td>" for n in names) + "</tr>"
        for fid, s in per_fragment.items()
    )
    rows += "<tr class=mean><td>mean</td>" + "".join(f"<td>{mean[n]:.4f}</td>" for n in names) + "</tr>"
    body = "".join(_png_tag(p, html.escape(c)) for p, c in figures if Path(p).exists())
    note_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;
padding:3px 8px;text-align:right}}tr.mean{{font-weight:bold;background:#eef}}img{{max-width:100%}}
figure{{margin:1em 0}}</style></head><body><h1>{html.escape(title)}</h1>
<table><tr><th>fragment</th>{head}</tr>{rows}</table><ul>{note_html}</ul>{body}</body></html>"""
    write_text(path, page)
