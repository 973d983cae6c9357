"""Every error onboard raises derives from :class:`OnboardError`.

Each one also inherits the builtin it refines, so callers that only know Python's own exceptions
(``ValueError``, ``OSError``) still catch them. Every message names the file and the problem,
because on orbit the message is often all that comes back.
"""

from __future__ import annotations

from pathlib import Path


class OnboardError(Exception):
    """Root of every onboard error."""


class SceneError(OnboardError, ValueError):
    """A scene or frame cannot be used as given."""

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        where = f"{self.path}: " if self.path else ""
        super().__init__(f"{where}{problem}")


class NotATiffError(SceneError):
    """The file is not a TIFF at all."""


class CorruptTiffError(SceneError):
    """The file starts as a TIFF but is truncated or its contents cannot be decoded."""


class GeoreferenceError(SceneError):
    """The GeoTIFF tags are missing, inconsistent or not understood."""


class BandError(SceneError):
    """A band is missing, unknown, duplicated, or the band count does not match."""


class InvalidPixelsError(SceneError):
    """Too many pixels are NaN, infinite, nodata or saturated to trust a tile."""


class SpoolError(OnboardError, OSError):
    """The spool folder or its journal cannot be read or written."""


class ProductWriteError(OnboardError, OSError):
    """A product could not be written (full disk, permissions, ...). Nothing partial is left."""


class ConfigError(OnboardError, ValueError):
    """A configuration file or option is invalid."""


class CompileError(OnboardError, ValueError):
    """``onboard compile`` cannot turn the given model, data or options into a bundle."""


class AccuracyGateError(CompileError):
    """A compile step lost more of the model's metric than ``--max-drop`` allows."""

    def __init__(self, message: str, step: str = "", report: dict | None = None) -> None:
        self.step = step
        self.report = report
        super().__init__(message)


class SizeBudgetError(CompileError):
    """The bundle is larger than the uplink budget (``--max-size``)."""
