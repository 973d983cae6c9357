"""Runtime configuration: one TOML file mapped onto typed dataclasses.

Each part of the runtime owns its section and the frozen dataclass behind it, and registers the
pair here (:func:`register_section`); this module knows no stage. One typed mapper
(:func:`build`) turns a TOML table into its dataclass, checking every value against the field's
annotation: ``count_shadow = "no"`` is an error, not a truthy string. Nested dataclasses are
nested tables, lists of dataclasses are arrays of tables (``[[passes]]``), relative paths are
taken from the config file's folder, and unknown keys or sections are errors: a typo in a config
uplinked to orbit must never be silently ignored.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Union

from onboard.runtime.errors import ConfigError, UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # JetPack 6 ships Python 3.10
    import tomli as tomllib


@dataclass(frozen=True)
class EngineConfig:
    """Which bundle a stage runs, on what, and its golden fallback."""

    bundle: Path
    golden: Path | None = None
    backend: str = "onnxruntime"
    device: str = "cpu"
    threads: int | None = None
    batch: int = 8  # tiles per engine call
    # Compiled engines (OpenVINO models, TensorRT plans) kept between runs; none: built on
    # every start.
    cache_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.backend not in ("onnxruntime", "openvino", "tensorrt"):
            raise ConfigError(f"backend must be onnxruntime, openvino or tensorrt, got "
                              f"{self.backend!r}")
        if self.threads is not None and not 1 <= self.threads <= 256:
            raise ConfigError(f"threads must be in [1, 256], got {self.threads}")
        if not 1 <= self.batch <= 1024:
            raise ConfigError(f"batch must be in [1, 1024], got {self.batch}")


# Kept for the callers of the earlier config (``onboard predict``'s golden fallback).
StageConfig = EngineConfig


@dataclass(frozen=True)
class Section:
    """A registered top-level section: its dataclass and whether it is a list of tables."""

    name: str
    cls: type
    many: bool = False
    doc: str = ""


_SECTIONS: dict[str, Section] = {}


def register_section(name: str, cls: type, *, many: bool = False, doc: str = "") -> type:
    """Make ``[name]`` (or ``[[name]]`` when ``many``) a known section mapped onto ``cls``."""
    if not is_dataclass(cls):
        raise UsageError(f"section {name!r}: {cls!r} is not a dataclass")
    known = _SECTIONS.get(name)
    if known is not None and known.cls is not cls:
        raise UsageError(f"section {name!r} is already registered to {known.cls.__name__}")
    _SECTIONS[name] = Section(name, cls, many, doc)
    return cls


def sections() -> dict[str, Section]:
    return dict(_SECTIONS)


class ConfigWarning(UserWarning):
    """A config that loads but likely does not do what its author meant (a stage without the
    one that should feed it, ...). Not an :class:`~onboard.runtime.errors.OnboardError`: the
    run goes on; the pipeline also records each one in telemetry (``config_warning``)."""


# Checks across sections: each takes the loaded config and returns warnings (plain sentences).
_CHECKS: list[Callable[[Config], list[str]]] = []


def register_check(check: Callable[[Config], list[str]]) -> Callable[[Config], list[str]]:
    """Run ``check`` on every loaded config; what it returns becomes :attr:`Config.warnings`
    and a :class:`ConfigWarning` at load."""
    if check not in _CHECKS:
        _CHECKS.append(check)
    return check


@dataclass(frozen=True)
class Config:
    """A loaded config: each present section as its dataclass (a tuple of them for lists)."""

    path: Path | None
    values: dict[str, Any]

    def get(self, name: str, default: Any = None) -> Any:
        return self.values.get(name, default)

    def __contains__(self, name: str) -> bool:
        return name in self.values

    @property
    def warnings(self) -> list[str]:
        """What the registered checks (:func:`register_check`) find in this config."""
        return [message for check in _CHECKS for message in check(self)]

    def section(self, name: str) -> Any:
        """The section's dataclass; its defaults when the file does not have it."""
        if name in self.values:
            return self.values[name]
        spec = _SECTIONS.get(name)
        if spec is None:
            raise ConfigError(f"no section {name!r} is registered")
        return () if spec.many else build(spec.cls, {}, f"[{name}]", Path("."))


def load_config(path: str | Path,
                overrides: dict[str, dict[str, Any]] | None = None) -> Config:
    """Read and check a config file; errors name the file, the section and the key.
    ``overrides`` (section -> key -> value, from the command line) replace those keys."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read config: {error}") from error
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from error
    for section, keys in (overrides or {}).items():
        table = data.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [{section}] is not a table; cannot override {keys}")
        table.update(keys)
    return config_from_dict(data, base=path.parent, where=str(path), path=path)


def config_from_dict(data: dict[str, Any], base: Path = Path("."), where: str = "config",
                     path: Path | None = None) -> Config:
    unknown = sorted(set(data) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {unknown}; known: {sorted(_SECTIONS)}")
    values: dict[str, Any] = {}
    for name, value in data.items():
        spec = _SECTIONS[name]
        label = f"{where}: [[{name}]]" if spec.many else f"{where}: [{name}]"
        if spec.many:
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                raise ConfigError(f"{label}: expected an array of tables ([[{name}]])")
            values[name] = tuple(build(spec.cls, v, f"{label} #{i + 1}", base)
                                 for i, v in enumerate(value))
        else:
            if not isinstance(value, dict):
                raise ConfigError(f"{label}: expected a table ([{name}]), got {value!r}")
            values[name] = build(spec.cls, value, label, base)
    config = Config(path, values)
    for message in config.warnings:
        warnings.warn(f"{where}: {message}", ConfigWarning, stacklevel=2)
    return config


def build(cls: type, data: dict[str, Any], where: str, base: Path) -> Any:
    """``cls`` from a TOML table, every value checked against its field's annotation."""
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls) if f.init}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    missing = [name for name, f in known.items() if name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}: missing key(s) {missing}")
    values = {key: _convert(hints[key], value, f"{where}.{key}", base)
              for key, value in data.items()}
    try:
        return cls(**values)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from error
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where}: {error}") from error


def _describe(kind: Any) -> str:
    return getattr(kind, "__name__", None) or str(kind).replace("typing.", "")


def _convert(kind: Any, value: Any, where: str, base: Path) -> Any:
    origin = typing.get_origin(kind)
    if origin in (Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, where, base)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"{where}: expected {_describe(kind)}, got {value!r}")
    if origin is typing.Literal:
        allowed = typing.get_args(kind)
        if value not in allowed:
            raise ConfigError(f"{where}: expected one of {list(allowed)}, got {value!r}")
        return value
    if origin in (tuple, list):
        args = typing.get_args(kind)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected an array, got {value!r}")
        item = args[0] if args else Any
        items = [_convert(item, v, f"{where}[{i}]", base) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        key_kind, value_kind = typing.get_args(kind) or (str, Any)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return {_convert(key_kind, k, where, base): _convert(value_kind, v, f"{where}.{k}", base)
                for k, v in value.items()}
    if is_dataclass(kind):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return build(kind, value, where, base)  # type: ignore[arg-type]
    if kind is Any:
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if kind is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: expected a path string, got {value!r}")
        path = Path(value)
        return path if path.is_absolute() else base / path
    if kind is datetime:
        if isinstance(value, str):
            try:
                value = datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                raise ConfigError(f"{where}: expected a date-time, got {value!r}") from None
        if not isinstance(value, datetime):
            raise ConfigError(f"{where}: expected a date-time, got {value!r}")
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    raise ConfigError(f"{where}: no TOML mapping for a field of type {_describe(kind)}")
