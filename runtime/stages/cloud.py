"""The cloud stage: each tile's cloud and shadow mask, its clear fraction, and the gate.

Cloud gating at source is the flight-proven use of onboard AI: Φ-Sat-1 dropped images over 70 %
cloud and saved about 30 % of its downlink. A tile whose model output is not finite fails; it is
never called clear, because a confident "cloud-free" on garbage is the worst answer a flight
filter can give.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np

from onboard.runtime.bands import resolve_band_indices
from onboard.runtime.config import EngineConfig
from onboard.runtime.engines import open_engine
from onboard.runtime.engines.base import Engine
from onboard.runtime.errors import ConfigError
from onboard.runtime.scores import Decision, TileScore
from onboard.runtime.stages.base import StageContext, TileWork, register_stage

CLEAR, CLOUD, SHADOW = 0, 1, 2
NODATA_CLASS = 255
ACTIONS = ("drop", "demote")
# The cloud models downsample by 4 and then 2 inside: inputs are padded to a multiple of this.
_SIZE_MULTIPLE = 16


@dataclass(frozen=True)
class CloudGate:
    """Tiles with more than ``max_cloud_fraction`` cloud (plus shadow, if counted) are dropped
    or demoted (kept, at lower downlink priority)."""

    max_cloud_fraction: float = 0.7
    action: Literal["drop", "demote"] = "drop"
    count_shadow: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_cloud_fraction <= 1.0:
            raise ConfigError(f"max_cloud_fraction must be in [0, 1], got "
                              f"{self.max_cloud_fraction}")
        if self.action not in ACTIONS:
            raise ConfigError(f"cloud gate action must be one of {ACTIONS}, got {self.action!r}")


@dataclass(frozen=True)
class CloudConfig(EngineConfig):
    gate: CloudGate = field(default_factory=CloudGate)


def class_mask(logits: np.ndarray) -> np.ndarray:
    """(K, H, W) scores -> (H, W) uint8 class of the highest score (the first on ties, like
    argmax), without argmax's strided pass over the class axis."""
    count = logits.shape[0]
    if count < 2:
        return np.zeros(logits.shape[1:], np.uint8)
    # A bool array viewed as uint8 is already the 0/1 mask of the first comparison, and
    # copyto(where=) writes in place where boolean-index assignment first gathers indices:
    # together about four times faster on a 256² core than the general loop.
    mask = np.greater(logits[1], logits[0]).view(np.uint8)
    if count == 2:
        return mask
    best = np.maximum(logits[0], logits[1])
    higher = np.empty(mask.shape, bool)
    for k in range(2, count):
        np.greater(logits[k], best, out=higher)
        np.copyto(mask, np.uint8(k), where=higher)
        if k + 1 < count:
            np.maximum(best, logits[k], out=best)
    return mask


@dataclass
class CloudFractions:
    cloud: float
    shadow: float
    clear: float
    valid: float


def fractions(mask: np.ndarray) -> CloudFractions:
    """Class fractions over the pixels of ``mask`` that carry data."""
    # One vectorised comparison per class instead of gathering the known pixels and widening
    # them to intp for bincount; the counts, and so the fractions, are the same.
    n = mask.size - int(np.count_nonzero(mask == NODATA_CLASS))
    if n == 0:
        return CloudFractions(0.0, 0.0, 0.0, 0.0)
    cloud, shadow, clear = (int(np.count_nonzero(mask == k)) for k in (CLOUD, SHADOW, CLEAR))
    return CloudFractions(cloud / n, shadow / n, clear / n, n / mask.size)


class CloudStage:
    name: ClassVar[str] = "cloud"

    def __init__(self, engine: Engine, gate: CloudGate | None = None) -> None:
        task = engine.manifest.task
        if task != "cloud":
            raise ConfigError(f"{engine.bundle.path}: the cloud stage needs a cloud bundle, got "
                              f"task {task!r}")
        self.engine = engine
        self.gate = gate or CloudGate()
        self.spec = engine.input_spec
        self.bands = tuple(self.spec.bands)
        self._buffer: np.ndarray | None = None

    def describe(self) -> dict[str, Any]:
        return {"stage": self.name, **self.engine.describe()}

    def close(self) -> None:
        self.engine.close()

    def _input(self, work: TileWork) -> np.ndarray:
        frame = work.frame.select(list(self.bands))
        x = self.spec.normalise(frame.pixels)
        if frame.valid is not None and not frame.valid.all():
            x[:, ~frame.valid] = 0.0  # NaNs would poison whole convolution windows
        h, w = x.shape[1:]
        ph, pw = -h % _SIZE_MULTIPLE, -w % _SIZE_MULTIPLE
        if ph or pw:
            mode = "reflect" if ph < h and pw < w else "edge"
            x = np.pad(x, ((0, 0), (0, ph), (0, pw)), mode=mode)
        return x

    def _batch_input(self, batch: list[TileWork]) -> np.ndarray:
        """The engine's (N, C, H, W) input, each tile normalised straight into its slot.

        The arithmetic of ``spec.normalise`` (cast to float32, times scale, plus offset), but
        without the band-selection copy, the three float temporaries per tile and the final
        stack; tiles that need padding (or differ in size) take the general path."""
        shape = batch[0].frame.shape
        if any(w.frame.shape != shape for w in batch) or shape[0] % _SIZE_MULTIPLE \
                or shape[1] % _SIZE_MULTIPLE:
            return np.stack([self._input(work) for work in batch])
        scale = np.asarray(self.spec.scale, np.float32)
        offset = np.asarray(self.spec.offset, np.float32)
        # One buffer per stage, reused: a fresh 10 MB batch costs page faults on every call.
        # Safe because a stage runs one batch at a time and engines copy nothing out of it.
        wanted = (len(self.bands), *shape)
        if self._buffer is None or self._buffer.shape[1:] != wanted \
                or len(self._buffer) < len(batch):
            self._buffer = np.empty((len(batch), *wanted), np.float32)
        x = self._buffer[: len(batch)]
        # A value that overflows float32 here becomes inf, which the finite check on the
        # model's output turns into a failed tile: the overflow is handled, not a surprise.
        with np.errstate(over="ignore"):
            self._fill(x, batch, scale, offset)
        return x

    def _fill(self, x: np.ndarray, batch: list[TileWork], scale: np.ndarray,
              offset: np.ndarray) -> None:
        for slot, work in zip(x, batch, strict=True):
            frame = work.frame
            indices = resolve_band_indices(list(frame.bands), list(self.bands), frame.source_id)
            for c, index in enumerate(indices):
                # Cast first, then multiply in place: a mixed-type ufunc call is about twice
                # as slow as the plain cast and the float32 multiply it stands for.
                slot[c] = frame.pixels[index]
                np.multiply(slot[c], scale[c], out=slot[c])
                np.add(slot[c], offset[c], out=slot[c])
            if frame.valid is not None and not frame.valid.all():
                slot[:, ~frame.valid] = 0.0  # NaNs would poison whole convolution windows

    def process(self, batch: list[TileWork]) -> list[TileScore]:
        logits = self.engine.run(self._batch_input(batch))
        finite = np.isfinite(logits.reshape(len(batch), -1)).all(axis=1)
        for work, out, ok in zip(batch, logits, finite, strict=True):
            if not ok:
                work.score.fail("cloud: the model output is not finite")
                continue
            mask = class_mask(work.core_of(out[:, : work.frame.shape[0], : work.frame.shape[1]]))
            if work.frame.valid is not None:
                valid = work.core_of(work.frame.valid)
                if not valid.all():  # the common case: skip the inverted copy and the scatter
                    np.copyto(mask, np.uint8(NODATA_CLASS), where=~valid)
            work.layers["cloud"] = mask
            self.judge(work.score, fractions(mask))
        return [work.score for work in batch]

    def judge(self, score: TileScore, found: CloudFractions) -> None:
        score.values.update(cloud_fraction=found.cloud, shadow_fraction=found.shadow,
                            clear_fraction=found.clear, valid_fraction=found.valid)
        if found.valid == 0.0:
            score.lower(Decision.DROP, "cloud: no valid pixels")
            return
        covered = found.cloud + found.shadow if self.gate.count_shadow else found.cloud
        what = "cloud and shadow" if self.gate.count_shadow else "cloud"
        limit = self.gate.max_cloud_fraction
        if covered > limit:
            decision = Decision.DROP if self.gate.action == "drop" else Decision.DEMOTE
            score.lower(decision, f"cloud: {covered:.0%} {what} > {limit:.0%} limit")
        else:
            score.reasons.append(f"cloud: {covered:.0%} {what} <= {limit:.0%} limit")


def build_cloud_stage(config: CloudConfig, context: StageContext) -> CloudStage:
    engine = open_engine(config.bundle, config.backend, config.device, threads=config.threads,
                         batch_size=config.batch, fallback=config.golden,
                         telemetry=context.telemetry, cache_dir=config.cache_dir)
    expected = float(getattr(engine.input_spec, "radiometric_offset", 0.0))
    if expected != context.radiometric_offset:
        engine.close()
        raise ConfigError(
            f"{engine.bundle.path}: the bundle expects input with a radiometric offset of "
            f"{expected:g} DN but the source states {context.radiometric_offset:g} DN; "
            f"refusing to guess")
    return CloudStage(engine, config.gate)


register_stage("cloud", CloudConfig, build_cloud_stage, order=10)
