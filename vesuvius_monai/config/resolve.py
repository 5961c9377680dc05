"""A run's config from its layers, resolved in one step: :func:`resolve_config`.

Layers, lowest first; each sets only what it names, on top of the ones below it::

    built-in defaults      the dataclasses' defaults (the benchmarked recipe)
    base                   a stored run config (a checkpoint's, for evaluate / predict / tune-postprocess)
    fills                  plan.yaml, then postprocess.json: only for keys the config file and overrides leave out
    config file            --config FILE
    overrides              key=value on the command line, in order

A layer is a list of dotted assignments. A YAML mapping is read section by section, key by key; any other mapping
(``model.kwargs``, ``train.loss``) is one value, replaced whole by a layer that gives it; a dotted key such as
``model.kwargs.depth=3`` sets one value inside it. ``model.kwargs`` start from the defaults of the network the
layers finally name (the recipe's keywords for resunet3d, none for another network). An error names the layer
(file) that set the offending key.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml

from vesuvius_monai.config.checks import from_dict
from vesuvius_monai.config.sections import Config, ModelConfig
from vesuvius_monai.errors import VesuviusError
from vesuvius_monai.io.atomic import write_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layer:
    """One source of config values: dotted ``(key, value)`` assignments, in order, and their ``source`` (a file,
    named in errors; '' for the command line). Build one with :func:`mapping_layer`, :func:`overrides_layer` or
    :func:`dotted_layer`."""

    source: str
    pairs: tuple[tuple[str, Any], ...]

    def keys(self) -> list[str]:
        return [key for key, _ in self.pairs]


def mapping_layer(source: str, raw: dict) -> Layer:
    """A layer from a nested mapping (a YAML config, a stored run config); old keys are upgraded first."""
    return Layer(source, tuple(_assignments(upgrade_raw(raw))))


def overrides_layer(overrides: Sequence[str]) -> Layer:
    """The command line's ``key=value`` overrides as one layer (later ones win)."""
    return Layer("", tuple(parse_override(text) for text in overrides))


def dotted_layer(source: str, values: dict[str, Any]) -> Layer:
    """A layer from ``{"a.b": value}`` (a plan's values, a post-processing choice)."""
    return Layer(source, tuple(values.items()))


# --------------------------------------------------------------------------- reading


# A YAML alias repeats the node it names: nested aliases multiply ("billion laughs"), so that a few hundred bytes
# can stand for billions of values. A config, plan or dataset file needs a few aliases at most.
MAX_ALIAS_NODES = 10_000  # values that aliases may add to a YAML document, all of them together
MAX_YAML_BYTES = 64 * 2**20  # a config, plan or dataset file; a dataset of 100 000 fragments is about 20 MB


class YamlTooLarge(Exception):
    """A YAML document refused for what its aliases stand for (raised while it is read)."""


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a document whose aliases expand past :data:`MAX_ALIAS_NODES` values, or that
    refers to itself."""

    def compose_document(self) -> yaml.Node:
        node = super().compose_document()
        sizes: dict[int, int] = {}
        expanded = _expanded_size(node, sizes, set())
        if expanded - len(sizes) > MAX_ALIAS_NODES:
            raise YamlTooLarge(f"its aliases (*name) expand to {expanded} values, more than {MAX_ALIAS_NODES} "
                               f"beyond the {len(sizes)} written")
        return node


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """The number of values ``node`` stands for with every alias written out; ``sizes`` memoises each distinct node
    (so the walk is linear in the nodes written), ``open_nodes`` holds the nodes being measured (an alias to one of
    them makes the document infinite)."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        raise YamlTooLarge("an alias (*name) refers to a node that contains it (a recursive document)")
    open_nodes.add(key)
    if isinstance(node, yaml.MappingNode):
        children = [child for pair in node.value for child in pair]
    elif isinstance(node, yaml.SequenceNode):
        children = list(node.value)
    else:
        children = []
    sizes[key] = 1 + sum(_expanded_size(child, sizes, open_nodes) for child in children)
    open_nodes.discard(key)
    return sizes[key]


def load_yaml(text: str, what: str) -> Any:
    """``text`` parsed as YAML safely: plain values only, aliases bounded (:data:`MAX_ALIAS_NODES`). ``what`` names
    the source in errors (``"config file x.yaml"``, ``"override 'a=b'"``). Every YAML the package reads comes here."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        raise VesuviusError(f"{what} is not valid YAML: {' '.join(str(err).split())}") from None
    except YamlTooLarge as err:
        raise VesuviusError(f"{what} was refused: {err}") from None
    except RecursionError:
        raise VesuviusError(f"{what} was refused: it is nested too deeply") from None


def read_yaml_mapping(path: str | Path, what: str) -> dict:
    """A YAML file holding a mapping; ``what`` names the file's role in errors ("config file", ...)."""
    path = Path(path)
    if not path.is_file():
        raise VesuviusError(f"{what} not found: {path}")
    if path.stat().st_size > MAX_YAML_BYTES:
        raise VesuviusError(f"{what} {path} was refused: it holds {path.stat().st_size} bytes, more than the "
                            f"{MAX_YAML_BYTES} a YAML file may hold here")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise VesuviusError(f"{what} {path} is not UTF-8 text (byte {err.start}); is it a YAML file?") from None
    except OSError as err:
        raise VesuviusError(f"{what} {path} cannot be read: {err.strerror}") from None
    raw = load_yaml(text, f"{what} {path}") or {}
    if not isinstance(raw, dict):
        raise VesuviusError(f"{what} {path} must hold a mapping")
    return raw


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.steps=50"`` -> ``("train.steps", 50)`` (the value parsed as YAML)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise VesuviusError(f"override '{text}' must look like key=value (e.g. train.steps=50)")
    return key.strip(), load_yaml(value, f"override '{text}': the value") if value else None


def _set(node: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise VesuviusError(f"config key '{key}': '{part}' is not a section")
    node[parts[-1]] = copy.deepcopy(value)


# --------------------------------------------------------------------------- keys a layer sets


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1, "c": {}}}`` -> ``{"a.b": 1, "a.c": {}}``: every leaf of a nested mapping by its dotted key
    (an empty mapping is a leaf)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def explicit_keys(raw: dict, overrides: Sequence[str] = ()) -> set[str]:
    """Dotted keys a raw config mapping (a YAML file) and ``key=value`` overrides set: every leaf, e.g.
    {"train.steps", "model.kwargs.depth"}; an empty mapping counts as set itself (``model.kwargs={}``)."""
    keys = set(flatten(raw))
    for key, value in overrides_layer(overrides).pairs:
        keys |= set(flatten({key: value}))
    return keys


def covered(key: str, explicit: set[str]) -> bool:
    """True when ``key``, one of its parents or one of its children is set explicitly, or, for a model keyword, any
    model keyword is (the network's keywords are the user's then, as a whole)."""
    parts = key.split(".")
    if any(".".join(parts[:i]) in explicit for i in range(1, len(parts) + 1)):
        return True
    if any(e.startswith(key + ".") for e in explicit):
        return True
    return key.startswith("model.kwargs") and any(e.startswith("model.kwargs") for e in explicit)


def _assignments(raw: dict, section: Any = Config, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) pairs of a nested mapping: sections are walked key by key, every other value is one
    pair (``model.kwargs`` and ``train.loss`` whole); unknown keys are kept as they are (the sections name them)."""
    hints = typing.get_type_hints(section) if dataclasses.is_dataclass(section) else {}
    whole = {f.name for f in dataclasses.fields(section) if f.metadata.get("whole")} if hints else set()
    pairs = []
    for key, value in raw.items():
        hint = hints.get(key)
        if isinstance(value, dict) and dataclasses.is_dataclass(hint) and key not in whole:
            pairs += _assignments(value, hint, f"{prefix}{key}.")
        else:
            pairs.append((f"{prefix}{key}", value))
    return pairs


# --------------------------------------------------------------------------- resolution


def resolve_config(config_file: str | Path | None = None, overrides: Sequence[str] = (), *,
                   base: Layer | None = None, fills: Sequence[Layer] = ()) -> Config:
    """The run config: built-in defaults < ``base`` < ``fills`` (only keys the config file and overrides leave out)
    < ``config_file`` < ``overrides``; see the module docstring."""
    raw = read_yaml_mapping(config_file, "config file") if config_file is not None else {}
    explicit = explicit_keys(raw, overrides)
    layers = [base] if base is not None else []
    for fill in fills:
        kept = tuple((k, v) for k, v in fill.pairs if not covered(k, explicit))
        log.info("%s: using %s", fill.source, " ".join(f"{k}={v}" for k, v in kept) or "nothing (all keys are set)")
        layers.append(Layer(fill.source, kept))
    if config_file is not None:
        layers.append(mapping_layer(str(config_file), raw))
    layers.append(overrides_layer(overrides))
    return build(layers)


def build(layers: Sequence[Layer]) -> Config:
    """Apply ``layers`` (lowest first) to the built-in defaults and check the result.

    ``model.kwargs`` start from the defaults of the network the layers finally name (the recipe's keywords for the
    default network, none for another), so that ``model.name=unet`` alone gives MONAI's UNet its own defaults.
    """
    raw = to_dict(Config())
    name = next((v for layer in reversed(layers) for k, v in reversed(layer.pairs) if k == "model.name"), None)
    if isinstance(name, str):
        raw["model"]["kwargs"] = ModelConfig(name=name).kwargs
    for layer in layers:
        for key, value in layer.pairs:
            try:
                _set(raw, key, value)
            except VesuviusError as err:
                raise VesuviusError(f"{layer.source}: {err}" if layer.source else str(err)) from None
    try:
        return from_dict(Config, raw)
    except VesuviusError as err:
        source = _source_of(str(err), layers)
        raise VesuviusError(f"{source}: {err}" if source else str(err)) from None


def _source_of(message: str, layers: Sequence[Layer]) -> str:
    """The source of the last layer that set the key named in ``message`` ('' when none did)."""
    found = re.search(r"config key '([^']+)'", message)
    if not found:
        return ""
    key = found.group(1)
    for layer in reversed(layers):
        if any(k == key or key.startswith(k + ".") or k.startswith(key + ".") for k in layer.keys()):
            return layer.source
    return ""


# Keys that older versions wrote (into config.yaml and checkpoints): old dotted key -> new key, or None (dropped).
RENAMED_KEYS: dict[str, str | None] = {"synth.shape": "synth.params.shape",
                                       "infer.halo": None}  # blocks share partial sums now: no halo


def upgrade_raw(raw: dict) -> dict:
    """A copy of a raw config mapping with the keys of :data:`RENAMED_KEYS` moved (or dropped), logged once each."""
    raw = copy.deepcopy(raw)
    for old, new in RENAMED_KEYS.items():
        *parents, leaf = old.split(".")
        node = raw
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            continue
        value = node.pop(leaf)
        if new is None:
            log.warning("config key '%s' is no longer used; ignoring it", old)
            continue
        _set(raw, new, value)
        log.info("config key '%s' is now '%s'", old, new)
    return raw


# --------------------------------------------------------------------------- short forms and output


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """A config file (or the built-in defaults when ``path`` is None) with ``key=value`` overrides."""
    return resolve_config(path, overrides)


def config_from_raw(raw: dict, overrides: Sequence[str] = ()) -> Config:
    """A stored config (a run's config.yaml, a checkpoint's) read with today's defaults, plus overrides."""
    return resolve_config(None, overrides, base=mapping_layer("", raw))


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples as lists) of a config or one of its sections, ready for YAML or a checkpoint."""

    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(cfg))


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
