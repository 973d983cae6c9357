"""Stages: small objects with one method, ``process(batch)``, composed by the pipeline.

Every module of this package is imported here, so a stage registers itself by existing.
"""

import importlib
import pkgutil

from onboard.runtime.stages.base import (
    Stage,
    StageContext,
    StageSpec,
    TileWork,
    register_stage,
    registered_stages,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Stage", "StageContext", "StageSpec", "TileWork", "register_stage",
           "registered_stages"]
