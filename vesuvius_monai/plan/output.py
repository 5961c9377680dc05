"""The plan itself (:class:`Plan`: planned keys, reasons and what they came from), as a config layer, as text and as
a file."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vesuvius_monai.config import Layer, dotted_layer, from_dict, read_yaml_mapping, to_dict
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

    def layer(self, source: str = "plan") -> Layer:
        """The planned values as a config layer (:func:`vesuvius_monai.config.resolve_config` fills with it only the
        keys the user's config file and overrides leave out)."""
        return dotted_layer(source, self.values)


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
    try:
        plan = from_dict(Plan, raw, "plan")
    except VesuviusError as err:
        raise VesuviusError(f"{path}: {err}") from None
    if set(plan.reasons) != set(plan.values):
        raise VesuviusError(f"{path}: every planned key needs one reason (keys {sorted(plan.values)}, reasons for "
                            f"{sorted(plan.reasons)})")
    return plan
