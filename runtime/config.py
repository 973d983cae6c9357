"""Runtime configuration: one TOML file mapped onto typed dataclasses.

    [cloud]
    bundle = "bundles/cloud-4band-int8.onboard"
    golden = "bundles/cloud-4band-fp32.onboard"   # used, and reported, if the primary is refused
    backend = "onnxruntime"
    device = "cpu"
    threads = 2
    batch = 4
    [cloud.gate]
    max_cloud_fraction = 0.7
    action = "drop"

    [tiling]
    tile = 256
    overlap = 16

Relative paths are taken from the config file's folder. Unknown keys are errors: a typo in a
config uplinked to orbit must not be silently ignored.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from onboard.runtime.errors import ConfigError
from onboard.runtime.stages.cloud import CloudGate

if sys.version_info >= (3, 11):
    import tomllib
else:  # JetPack 6 ships Python 3.10
    import tomli as tomllib


@dataclass(frozen=True)
class StageConfig:
    """Which bundle a stage runs, on what, and its golden fallback."""

    bundle: Path
    golden: Path | None = None
    backend: str = "onnxruntime"
    device: str = "cpu"
    threads: int | None = None
    batch: int = 4


@dataclass(frozen=True)
class TilingConfig:
    tile: int = 256
    overlap: int = 16

    def __post_init__(self) -> None:
        if self.tile <= 0 or not 0 <= self.overlap < self.tile:
            raise ConfigError(f"tile must be positive and overlap must be in [0, tile), got "
                              f"tile {self.tile}, overlap {self.overlap}")


@dataclass(frozen=True)
class RuntimeConfig:
    cloud: StageConfig | None = None
    cloud_gate: CloudGate = field(default_factory=CloudGate)
    tiling: TilingConfig = field(default_factory=TilingConfig)
    telemetry: Path | None = None


def _build(cls: type, data: dict[str, Any], where: str, base: Path) -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    values = {}
    for key, value in data.items():
        kind = str(known[key].type)
        if "Path" in kind and value is not None:
            if not isinstance(value, str):
                raise ConfigError(f"{where}.{key}: expected a path string, got {value!r}")
            path = Path(value)
            value = path if path.is_absolute() else base / path
        elif kind.startswith("int") and not isinstance(value, int):
            raise ConfigError(f"{where}.{key}: expected an integer, got {value!r}")
        elif kind.startswith("float") and not isinstance(value, (int, float)):
            raise ConfigError(f"{where}.{key}: expected a number, got {value!r}")
        elif kind.startswith("str") and not isinstance(value, str):
            raise ConfigError(f"{where}.{key}: expected a string, got {value!r}")
        values[key] = value
    try:
        return cls(**values)
    except TypeError as error:
        raise ConfigError(f"{where}: {error}") from error


def load_config(path: str | Path) -> RuntimeConfig:
    """Read and check a runtime config; errors name the file and the key."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from error
    base = path.parent
    where = str(path)
    unknown = sorted(set(data) - {"cloud", "tiling", "telemetry"})
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {unknown}")
    cloud = dict(data.get("cloud", {}))
    gate = cloud.pop("gate", {})
    try:
        return RuntimeConfig(
            cloud=_build(StageConfig, cloud, f"{where}: [cloud]", base) if cloud else None,
            cloud_gate=_build(CloudGate, gate, f"{where}: [cloud.gate]", base),
            tiling=_build(TilingConfig, data.get("tiling", {}), f"{where}: [tiling]", base),
            telemetry=(base / data["telemetry"]) if "telemetry" in data else None,
        )
    except ConfigError as error:
        if str(error).startswith(where):
            raise
        raise ConfigError(f"{where}: {error}") from error
