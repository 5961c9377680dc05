"""The plan itself (:class:`Plan`: planned keys, reasons and what they came from), the keys a user set, and the
plan as text and as a file."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from vesuvius_monai.config import read_yaml_mapping, set_override, to_dict
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io.atomic import write_text


@dataclass(kw_only=True)
class Plan:
    """Chosen config values (dotted key -> value) with a one-line reason each, and what they came from."""

    values: dict[str, Any]
    reasons: dict[str, str]
    fingerprint: dict[str, Any] = field(default_factory=dict)
    measurements: list[dict[str, Any]] = field(default_factory=list)
    budget_minutes: float = 0.0
    device: str = "cpu"
    chosen: dict[str, Any] = field(default_factory=dict)  # the chosen candidate: patch, width, depth, batch

    def overrides(self, exclude: Iterable[str] = ()) -> list[str]:
        """``key=value`` strings (values in YAML flow style) of the planned keys, leaving out every key in
        ``exclude``, under one of them (excluding ``model.kwargs`` drops ``model.kwargs.depth``) or above one
        (excluding ``model.kwargs.depth`` drops every ``model.kwargs.*`` key, so the model stays as the user set it)."""
        exclude = set(exclude)
        return [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
                for key, value in self.values.items() if not covered(key, exclude)]


def covered(key: str, exclude: set[str]) -> bool:
    """True when ``key`` or one of its parents is excluded, or a model keyword is (the model is then the user's)."""
    parts = key.split(".")
    if any(".".join(parts[:i]) in exclude for i in range(1, len(parts) + 1)):
        return True
    return key.startswith("model.kwargs.") and any(e.startswith("model.kwargs") for e in exclude)


def explicit_keys(raw: dict, overrides: Sequence[str] = ()) -> set[str]:
    """Dotted keys a raw config mapping (a YAML file) and ``key=value`` overrides set: every leaf, e.g.
    {"train.steps", "model.kwargs.depth"}; an empty mapping counts as set itself (``model.kwargs={}``)."""
    keys: set[str] = set()

    def walk(node: Any, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict) and value:
                walk(value, f"{prefix}{key}.")
            else:
                keys.add(f"{prefix}{key}")

    walk(raw, "")
    for override in overrides:
        single: dict = {}
        set_override(single, override)
        walk(single, "")
    return keys


def format_plan(plan: Plan) -> str:
    """One line per planned key: ``key = value  # reason``, after a header naming the budget and device."""
    fp = plan.fingerprint
    lines = [f"plan for {plan.budget_minutes:g} min on {plan.device}: {fp.get('n_train', '?')} training fragments, "
             f"smallest {fp.get('min_shape')}, spacing {fp.get('spacing')}, foreground "
             f"{fp.get('foreground_fraction', float('nan')):.1%}, ignore {fp.get('ignore_fraction', float('nan')):.1%}"]
    width = max((len(k) + len(str(v)) for k, v in plan.values.items()), default=0) + 3
    for key, value in plan.values.items():
        lines.append(f"{f'{key} = {value}':<{width}}  # {plan.reasons[key]}")
    return "\n".join(lines)


def save_plan(plan: Plan, path: str | Path) -> None:
    """Write the plan as YAML (values, reasons, fingerprint, measurements), atomically."""
    payload = {"format": "vesuvius_monai.plan/1", **to_dict(plan)}
    write_text(path, yaml.safe_dump(payload, sort_keys=False))


def load_plan(path: str | Path) -> Plan:
    """A plan written by :func:`save_plan`."""
    raw = read_yaml_mapping(path, "plan file")
    if raw.get("format") != "vesuvius_monai.plan/1":
        raise VesuviusError(f"{path}: not a plan written by vesuvius_monai (no format 'vesuvius_monai.plan/1')")
    raw.pop("format")
    return Plan(**raw)
