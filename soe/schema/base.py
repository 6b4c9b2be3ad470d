"""What every option dataclass shares: choices as string Enums, one-line errors that name the key,
and ``build``, which turns a recipe section (or a plain dict) into its dataclass.

An option dataclass is declared once and serves twice: OmegaConf reads it as the recipe schema
(types, defaults, unknown keys, the names of a choice) and the code takes an instance of it. Its
``__post_init__`` checks what a type cannot express and raises :class:`OptionError` with the key
relative to the dataclass; ``build`` puts the section's path in front (``stitch.connector.mlp: ...``).
"""
from __future__ import annotations

import dataclasses
import typing
from enum import StrEnum

from soe.errors import RecipeError, SoeError  # noqa: F401  (soe.schema.RecipeError)


class OptionError(RecipeError):
    """A bad option value; ``key`` is relative to the dataclass that checked it until ``build`` prefixes it."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"{key}: {reason}")
        self.key, self.reason = key, reason

    def under(self, prefix: str) -> "OptionError":
        return OptionError(f"{prefix}.{self.key}" if prefix and self.key else prefix or self.key, self.reason)


class Choice(StrEnum):
    """A closed set of names. A member equals, hashes and prints as its name (``repr`` too), so
    ``cfg.flow.timesteps == "shared"`` and messages read as plain text."""

    def __repr__(self) -> str:
        return repr(self.value)

    @classmethod
    def names(cls) -> list[str]:
        return [m.value for m in cls]


class _TorchDtype(Choice):
    @property
    def torch(self):
        """The ``torch.dtype`` of this name."""
        import torch

        return getattr(torch, self.value)


class Dtype(_TorchDtype):
    """Compute dtypes of experts and stored tensors (the name is the torch attribute)."""

    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class StorageDtype(_TorchDtype):
    """fp8 formats frozen weights can be stored in (each layer computes in the expert's dtype)."""

    float8_e4m3fn = "float8_e4m3fn"
    float8_e5m2 = "float8_e5m2"


def choice(cls: type[Choice], value, key: str) -> Choice:
    """``value`` as a member of ``cls``, or an OptionError listing the names."""
    if isinstance(value, cls):
        return value
    try:
        return cls(value)
    except ValueError:
        raise OptionError(key, f"expected one of {cls.names()}, got {value!r}") from None


def optional_choice(cls: type[Choice], value, key: str) -> Choice | None:
    if value is None:
        return None
    try:
        return choice(cls, value, key)
    except OptionError:
        raise OptionError(key, f"expected null or one of {cls.names()}, got {value!r}") from None


def require(ok: bool, key: str, reason: str) -> None:
    if not ok:
        raise OptionError(key, reason)


def device_problem(value) -> str | None:
    """Why ``value`` is not a device of this machine (None: it is). Checked where the recipe is read, so
    ``sample.device=cuda`` on a machine without a GPU is one line naming the key, not torch's traceback."""
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        return f"expected cpu, cuda, cuda:N or mps, got {value!r}"
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            return f"{value!r}, but this machine has no CUDA GPU (use cpu)"
        if device.index is not None and device.index >= count:
            return f"{value!r}, but this machine has {count} CUDA GPU(s): cuda:0 .. cuda:{count - 1}"
        return None
    if device.type == "mps":
        return None if torch.backends.mps.is_available() else f"{value!r}, but this machine has no MPS device (use cpu)"
    return f"expected cpu, cuda, cuda:N or mps, got {value!r} (soe does not run on {device.type})"


def check_device(value, key: str) -> None:
    """``value`` (None = soe's choice) as a device of this machine, or an OptionError naming ``key``."""
    if value is not None:
        problem = device_problem(value)
        if problem is not None:
            raise OptionError(key, problem)


def closest(name: str, names) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``names`` to a mistyped ``name``, else ''."""
    import difflib

    match = difflib.get_close_matches(str(name), [str(n) for n in names], n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def build(cls, value=None, key: str = ""):
    """``value`` (None for the defaults, an instance, a mapping or an OmegaConf node) as dataclass ``cls``.

    Nested option dataclasses (also in lists and dicts) are built first, each under its own key; a
    check that fails raises a RecipeError naming the full key, e.g. ``stitch.inject.b_to_a.targets.0.mode``.
    """
    if isinstance(value, cls):
        return value
    value = {} if value is None else value
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.init and f.name in value:
            kwargs[f.name] = _build_value(hints[f.name], value[f.name], f"{key}.{f.name}" if key else f.name)
    unknown = [k for k in value if k not in kwargs and k not in {f.name for f in dataclasses.fields(cls)}]
    if unknown:
        names = [f.name for f in dataclasses.fields(cls)]
        raise OptionError(f"{key}.{unknown[0]}" if key else str(unknown[0]), f"not an option of {cls.__name__}"
                          f"{closest(unknown[0], names)}; expected one of {names}")
    try:
        return cls(**kwargs)
    except OptionError as err:
        raise err.under(key) from None


def _build_value(tp, value, key: str):
    from omegaconf import OmegaConf

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union and type(None) in args:  # Optional[X]
        if value is None:
            return None
        tp = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if origin in (list, tuple) and args and dataclasses.is_dataclass(args[0]):
        return [build(args[0], v, f"{key}.{i}") for i, v in enumerate(value)]
    if origin is dict and len(args) == 2 and dataclasses.is_dataclass(args[1]):
        return {k: build(args[1], v, f"{key}.{k}") for k, v in value.items()}
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def command_settings(cls, prefix: str, overrides: list[str], literal: tuple[str, ...] = ()) -> tuple[list[str], object]:
    """Split a command's own ``<prefix>.<key>=value`` settings (``encode.batch_size=8``) from the recipe overrides.

    Returns ``(the other overrides, an instance of dataclass cls)``. OmegaConf checks types and unknown keys
    against ``cls``, its ``__post_init__`` checks values; every message names ``<prefix>.<key>``. Keys in
    ``literal`` (free text such as prompts) are taken as typed, never parsed as YAML."""
    from omegaconf import OmegaConf
    from omegaconf import errors as oc_errors

    ours = [o[len(prefix) + 1:] for o in overrides if o.startswith(prefix + ".")]
    texts = {k: v for k, _, v in (o.partition("=") for o in ours) if k in literal}
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls), OmegaConf.from_dotlist([o for o in ours if o.partition("=")[0] not in texts]))
        settings = OmegaConf.to_object(merged)
        if texts:
            settings = dataclasses.replace(settings, **texts)
    except oc_errors.OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise RecipeError(f"{prefix}.{key}: {(getattr(e, 'msg', None) or str(e)).splitlines()[0]}") from None
    except OptionError as err:
        raise err.under(prefix) from None
    return [o for o in overrides if not o.startswith(prefix + ".")], settings
