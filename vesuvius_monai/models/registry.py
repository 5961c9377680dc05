"""A small model registry: register a factory under a name, build it by name.

Modelled on timm's ``register_model`` (a decorator that records a factory) and MONAI's
``look_up_option`` (an unknown name gets a did-you-mean suggestion). Each entry also carries
its *size divisor*: every spatial input size must be a multiple of it (e.g. ``2 ** depth`` for a
UNet with ``depth`` pooling levels), so patch samplers and sliding-window inference can pick
valid sizes without building the network.

Usage::

    @register_model("resunet3d", size_divisor=lambda kw: 2 ** kw.get("depth", 3))
    def resunet3d(*, in_channels=1, out_channels=1, **kwargs) -> nn.Module: ...

    net = build_model("resunet3d", init_features=8)   # (B, 1, Z, Y, X) -> logits (B, 1, Z, Y, X)
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from vesuvius_monai.errors import VesuviusError, did_you_mean

logger = logging.getLogger(__name__)

Factory = Callable[..., nn.Module]
Divisor = int | Callable[[dict[str, Any]], int]


@dataclass(frozen=True)
class ModelEntry:
    """One registered model.

    Attributes:
        name: registry key.
        factory: keyword-only callable returning an ``nn.Module``.
        size_divisor: int, or a callable taking the build kwargs and returning an int.
        forwards_to: the class the factory passes its ``**kwargs`` to (its constructor keywords
            are accepted by :func:`build_model`), or None when the factory takes no ``**kwargs``.
    """

    name: str
    factory: Factory
    size_divisor: Divisor
    forwards_to: type | None = None


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(
    name: str, *, size_divisor: Divisor, forwards_to: type | None = None
) -> Callable[[Factory], Factory]:
    """Decorator registering a model factory under ``name``.

    Args:
        name: registry key; must not be registered yet.
        size_divisor: spatial input sizes must be multiples of this; an int, or a callable
            ``f(kwargs) -> int`` given the keyword arguments passed to :func:`build_model`.
        forwards_to: class whose constructor receives the factory's ``**kwargs`` (used only to
            check keyword names and list them in error messages).

    Returns:
        The decorator; it returns the factory unchanged.

    Raises:
        VesuviusError: ``name`` is already registered.
    """

    def decorator(factory: Factory) -> Factory:
        if name in _REGISTRY:
            raise VesuviusError(f"model '{name}' is already registered (by {_REGISTRY[name].factory.__qualname__})")
        _REGISTRY[name] = ModelEntry(name, factory, size_divisor, forwards_to)
        logger.debug("registered model %r", name)
        return factory

    return decorator


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_REGISTRY)


def _lookup(name: str) -> ModelEntry:
    """Return the entry for ``name``; unknown names raise with a did-you-mean suggestion."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    known = ", ".join(list_models())
    hint = did_you_mean(name, list_models()) or ";"
    raise VesuviusError(f"unknown model '{name}'{hint} known: {known}")


def _keywords(func: Callable[..., Any]) -> tuple[set[str], bool]:
    """Keyword names ``func`` accepts, and whether it also takes ``**kwargs``."""
    params = inspect.signature(func).parameters.values()
    named = {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    return named - {"self"}, any(p.kind is p.VAR_KEYWORD for p in params)


def accepted_keywords(name: str) -> set[str] | None:
    """Keywords ``build_model(name, ...)`` accepts; None when they cannot be known in advance."""
    entry = _lookup(name)
    named, has_var = _keywords(entry.factory)
    if not has_var:
        return named
    if entry.forwards_to is None:
        return None
    target_named, target_var = _keywords(entry.forwards_to)
    return None if target_var else named | target_named


def _check_keywords(name: str, kwargs: dict[str, Any]) -> None:
    """Raise a VesuviusError naming the first keyword the model does not accept."""
    accepted = accepted_keywords(name)
    if accepted is None:
        return
    for key in kwargs:
        if key not in accepted:
            raise VesuviusError(
                f"model '{name}' got an unknown keyword '{key}'; accepted: {', '.join(sorted(accepted))}"
            )


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name`` with keyword arguments ``kwargs``.

    Returns:
        The network; it maps (B, in_channels, Z, Y, X) to logits (B, out_channels, Z, Y, X)
        for spatial sizes that are multiples of :func:`size_divisor`.

    Raises:
        VesuviusError: unknown name (with a did-you-mean suggestion), unknown keyword, or a
            value the model's constructor rejects.
    """
    model = _build(name, kwargs)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("built model %r with %d parameters", name, n_params)
    return model


def check_model(name: str, kwargs: dict[str, Any]) -> None:
    """Raise the VesuviusError :func:`build_model` would raise for ``name`` and ``kwargs``, without memory or time:
    the network is built on PyTorch's ``meta`` device (shapes only, no weights) and dropped. Call it before a
    command creates anything."""
    with torch.device("meta"):
        _build(name, kwargs)


def _build(name: str, kwargs: dict[str, Any]) -> nn.Module:
    entry = _lookup(name)
    _check_keywords(name, kwargs)
    try:
        return entry.factory(**kwargs)
    except TypeError as exc:
        if "argument" not in str(exc):
            raise
        raise VesuviusError(f"model '{name}' rejected its keyword arguments: {exc}") from exc
    except (ValueError, AssertionError) as exc:
        raise VesuviusError(f"model '{name}' rejected its parameters {kwargs}: {exc}") from exc


def size_divisor(name: str, **kwargs: Any) -> int:
    """Every spatial input size of ``build_model(name, **kwargs)`` must be a multiple of this.

    Raises:
        VesuviusError: unknown name.
    """
    divisor = _lookup(name).size_divisor
    if not callable(divisor):
        return int(divisor)
    try:
        return int(divisor(kwargs))
    except (TypeError, ValueError) as exc:
        raise VesuviusError(f"model '{name}': its keyword arguments {dict(kwargs)} do not give an input size "
                            f"divisor ({exc})") from None


def check_input_sizes(name: str, kwargs: dict[str, Any], sizes: dict[str, Sequence[int]]) -> None:
    """Raise a VesuviusError unless every named (z, y, x) size is a multiple of the model's size divisor.

    ``sizes`` maps a config key to its size, e.g. ``{"transforms.patch_size": (64, 64, 64),
    "infer.roi_size": (64, 64, 64)}``; the error names the first key that does not fit, the divisor and
    the model. Call it at every entry that feeds patches or windows to ``build_model(name, **kwargs)``.
    """
    divisor = size_divisor(name, **kwargs)
    for key, size in sizes.items():
        if any(int(s) % divisor for s in size):
            raise VesuviusError(f"config key '{key}': {list(size)} must be multiples of {divisor} for model "
                                f"'{name}' with kwargs {dict(kwargs)}")
