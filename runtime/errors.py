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


class StorageError(OnboardError, OSError):
    """A file the runtime writes or keeps (product, state, journal, queue) cannot be written or
    read back: full disk, permissions, a damaged journal. Nothing partial is left."""

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        where = f"{self.path}: " if self.path else ""
        super().__init__(f"{where}{problem}")


class ProductWriteError(StorageError):
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


class BundleError(OnboardError, ValueError):
    """A model bundle cannot be trusted or used: damaged, malformed, or not for this runtime."""

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        where = f"{self.path}: " if self.path else ""
        super().__init__(f"{where}{problem}")


class BundleChecksumError(BundleError):
    """A bundle's bytes do not match its checksums (bit flip on uplink, truncated file, ...)."""


class BundleSchemaError(BundleError):
    """A bundle's manifest is from a newer schema, or is missing or has invalid fields."""


class BundleFormatError(BundleError):
    """The file is not a bundle, or a member the manifest names (an engine file) is missing."""


class BundleNotFoundError(OnboardError, FileNotFoundError):
    """The bundle file does not exist or cannot be read."""


class EngineError(OnboardError, RuntimeError):
    """An inference engine cannot be loaded or failed while running."""


class EngineUnavailableError(EngineError):
    """The backend or device asked for is not installed or not present on this machine."""


class EngineVersionError(EngineError):
    """A compiled engine was built by another toolchain version (TensorRT) than the one here."""


class EngineInputError(EngineError, ValueError):
    """A batch given to an engine has the wrong shape, band count or data type."""


class ProtocolError(OnboardError, ValueError):
    """A message on the hardware-in-loop frame link (``onboard serve``) is malformed, too large,
    cut short, or cannot be honoured. ``fatal`` when the stream cannot be resynchronised and the
    connection must close."""

    def __init__(self, peer: str | None, problem: str, fatal: bool = False) -> None:
        self.peer = peer
        self.problem = problem
        self.fatal = fatal
        where = f"{peer}: " if peer else ""
        super().__init__(f"{where}{problem}")


class BundleSignatureError(BundleError):
    """A bundle is not signed by a key this runtime trusts: unsigned where signatures are
    required, signed by an unknown key, or its signature does not verify (changed or forged)."""


class ShapeError(OnboardError, ValueError):
    """An array handed to the runtime has the wrong shape, type or order (a tile result that
    does not fit its grid, latent codes of another size)."""


class UsageError(OnboardError, TypeError):
    """The runtime was called the wrong way by code (a section registered twice, a manifest
    built with both or neither of its spec forms): a programming error, found at once."""


class StagedFileMissingError(OnboardError, FileNotFoundError):
    """The ground's CFDP filestore was asked for a file that no transaction is writing (cfdp-py
    turns a FileNotFoundError into the matching fault)."""


class ProductNameError(OnboardError, PermissionError):
    """A CFDP transfer named a path or a hidden file, not a product file name (cfdp-py turns a
    PermissionError into a Filestore Rejection fault)."""
