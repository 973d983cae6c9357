"""Model bundles: one verified file holding a manifest and the engine files; what is uplinked.

:mod:`.manifest` is the schema (what a model takes and gives, validation, the constants);
:mod:`.container` is the file (the zip, the checksums, the trailer, :class:`Bundle`,
:func:`write_bundle`). Everything is importable from here.
"""

from onboard.runtime.bundle.container import (
    SIGNATURE,
    SUFFIX,
    TRAILER_PREFIX,
    TRAILER_SIZE,
    Bundle,
    is_bundle,
    write_bundle,
    write_signed,
)
from onboard.runtime.bundle.manifest import (
    BACKENDS,
    DEFAULT_INPUT_NAME,
    DEFAULT_OUTPUT_NAME,
    INPUT_DTYPES,
    LAYOUTS,
    MANIFEST,
    MAX_LABEL,
    OUTPUT_KINDS,
    PRECISIONS,
    SCHEMA_1_OUTPUT_KINDS,
    SCHEMA_VERSION,
    TASKS,
    InputSpec,
    Manifest,
    OutputSpec,
)

__all__ = [
    "BACKENDS", "DEFAULT_INPUT_NAME", "DEFAULT_OUTPUT_NAME", "INPUT_DTYPES", "LAYOUTS",
    "MANIFEST", "MAX_LABEL", "OUTPUT_KINDS", "PRECISIONS", "SCHEMA_1_OUTPUT_KINDS",
    "SCHEMA_VERSION", "SIGNATURE", "SUFFIX", "TASKS", "TRAILER_PREFIX", "TRAILER_SIZE", "Bundle",
    "InputSpec", "Manifest", "OutputSpec", "is_bundle", "write_bundle", "write_signed",
]
