"""Super-resolution on board: a ×2 or sharpening bundle over whole scenes (``onboard predict``),
streamed into the output GeoTIFF, and over the tiles the planner chose for a ``superres``
product.

This is not a scoring stage (it scores nothing and must not slow the scoring pass): it has its
own section, ``[superres]`` (the bundle, its golden fallback, engine options), and the engine
is opened only when the first ``superres`` product is made (:class:`LazySuperResolver`), so a
pass whose plan chooses none never loads it.

The pass runner's hook, per contact window, for a chosen candidate of kind ``superres``::

    resolver = LazySuperResolver(config.section("superres"), telemetry)   # once per run
    product = resolver.make_product(maker, scene, Window(row, col, h, w))  # in _make

and the bundle's manifest (:attr:`LazySuperResolver.output`, read without loading the engine)
for the product's bands and scale factor when estimating its size.

Bundles: outputs are reflectance (the bundle's ``values``); they are turned back into the
input's DN (``value / scale - offset / scale`` of the matching input band) and its dtype, so a
×2 product of L1C DN is L1C DN. A ×2 bundle's output bands are its input bands; a sharpening
bundle's are the last ``channels`` of its input bands (B05 … B12 after the four 10 m bands).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from onboard.runtime.bundle.manifest import Manifest
from onboard.runtime.config import EngineConfig, register_section
from onboard.runtime.downlink.products import (
    Product,
    ProductMaker,
    SuperResOutput,
    write_geotiff,
)
from onboard.runtime.engines import open_engine
from onboard.runtime.engines.base import Engine
from onboard.runtime.errors import ConfigError, OnboardError, SceneError
from onboard.runtime.frame import Frame
from onboard.runtime.georef import Georef
from onboard.runtime.inference import Predictor
from onboard.runtime.sources.base import Scene, iter_tiles
from onboard.runtime.telemetry import Telemetry
from onboard.runtime.windows import Stitcher, StreamingStitcher, TileGrid, Window, tile_array

# Context each side of a seam: a plain convolution model sees 8 input pixels (7 convolution
# radii and the skip path's 1-2); 16 leaves room for a deeper model. A bundle that reads further
# (a fit over a window) states it as ``extra["superres"]["context"]``, and the overlap and the
# halo grow to cover it.
DEFAULT_OVERLAP = 32
DEFAULT_HALO = 16


@dataclass(frozen=True)
class SuperResConfig(EngineConfig):
    """``[superres]``: the super-resolution bundle for ``superres`` products."""

    batch: int = 4
    overlap: int = DEFAULT_OVERLAP  # between tiles inside a product or a scene
    halo: int = DEFAULT_HALO  # pixels of context read around a product's core

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.overlap <= 256 or not 0 <= self.halo <= 256:
            raise ConfigError(f"superres.overlap and halo must be in [0, 256], got "
                              f"{self.overlap} and {self.halo}")


register_section("superres", SuperResConfig,
                 doc="super-resolution bundle for superres products (opened on first use)")


def superres_output(manifest: Manifest, where: Path | str) -> SuperResOutput:
    """What a super-resolution bundle makes, from its manifest: output k is input band
    ``first + k`` (the same bands for x2, the last ones for sharpening), at its scale factor."""
    if manifest.task != "superres" or manifest.output.kind != "values":
        raise ConfigError(f"{where}: a super-resolution bundle has task superres and gives "
                          f"values, this one {manifest.task} and {manifest.output.kind}")
    bands, n_out = tuple(manifest.input.bands), manifest.output.channels
    if n_out > len(bands):
        raise ConfigError(f"{where}: {n_out} output channels for {len(bands)} input bands; no "
                          "input band to take DN units and names from")
    return SuperResOutput(int(manifest.output.scale_factor), bands[len(bands) - n_out:],
                          f"{manifest.name}@{manifest.version}")


class SuperResolver:
    """One super-resolution engine, with the DN conversion and tiling around it."""

    def __init__(self, engine: Engine, *, scale: float | None = None,
                 overlap: int = DEFAULT_OVERLAP, halo: int = DEFAULT_HALO,
                 batch: int = 4, tile: int | None = None) -> None:
        """``tile``: input pixels per tile side, at most the bundle's (default); a graph of
        any size runs the tiles as cut, a fixed-size one gets each padded to its size. Smaller
        tiles hold less; they must be wider than the overlap, so every core keeps its
        context."""
        self.engine = engine
        self.predictor = Predictor(engine, scale=scale)
        self.spec = self.predictor.spec
        self.output = engine.output_spec
        if self.output.kind != "values":
            raise ConfigError(f"{engine.bundle.path}: a super-resolution bundle gives values, "
                              f"this one {self.output.kind}")
        self.context = self._context(engine)
        if tile is not None and not max(overlap, 2 * self.context) < tile <= self.spec.tile_size:
            raise ConfigError(f"{engine.bundle.path}: tile {tile} must be wider than the "
                              f"overlap ({max(overlap, 2 * self.context)} pixels) and at most "
                              f"the bundle's tile ({self.spec.tile_size})")
        self.tile = tile or self.spec.tile_size
        shape = engine.model_input_shape
        if self.tile != self.spec.tile_size and len(shape) == 4 and shape[2] is None \
                and shape[3] is None:
            # A graph of any size runs each tile as cut: padded to the bundle's tile, the tiles
            # at the scene's bottom and right edges would show the padding to their last pixels
            # where a whole-image run shows the convolutions' own zero border.
            self.predictor.spec = self.spec = replace(self.spec, tile_size=self.tile)
        self.overlap = min(max(overlap, 2 * self.context), self.tile - 1)
        self.halo = max(halo, self.context)
        self.batch = batch
        self.described = superres_output(engine.manifest, engine.bundle.path)
        self.scale_factor = self.described.scale_factor
        self.first_band = len(self.spec.bands) - self.output.channels
        self.output_bands = self.described.bands

    @staticmethod
    def _context(engine: Engine) -> int:
        """Input pixels the model reads each side of an output pixel, as its bundle states."""
        stated = engine.manifest.extra.get("superres", {})
        context = stated.get("context", 0) if isinstance(stated, dict) else 0
        if not isinstance(context, int) or isinstance(context, bool) or not 0 <= context <= 128:
            raise ConfigError(f"{engine.bundle.path}: extra.superres.context must be an integer "
                              f"number of pixels in [0, 128], got {context!r}")
        return context

    @classmethod
    def from_config(cls, config: SuperResConfig, telemetry: Telemetry | None = None
                    ) -> SuperResolver:
        engine = open_engine(config.bundle, config.backend, config.device,
                             threads=config.threads, batch_size=config.batch,
                             fallback=config.golden, telemetry=telemetry,
                             cache_dir=config.cache_dir)
        return cls(engine, overlap=config.overlap, halo=config.halo, batch=config.batch)

    def close(self) -> None:
        self.engine.close()

    # -- values and DN ----------------------------------------------------------------------

    def to_dn(self, values: np.ndarray, dtype: np.dtype) -> np.ndarray:
        """Model output (C, H, W) reflectance -> the input's DN in ``dtype`` (rounded and
        clipped for integers; non-finite values become 0, the no-data DN)."""
        k = slice(self.first_band, None)
        scale = np.asarray(self.spec.scale, np.float32)[k].reshape(-1, 1, 1)
        offset = np.asarray(self.spec.offset, np.float32)[k].reshape(-1, 1, 1)
        dn = (values - offset) / scale
        dtype = np.dtype(dtype)
        if dtype.kind in "ui":
            info = np.iinfo(dtype)
            dn = np.nan_to_num(dn, nan=0.0, posinf=info.max, neginf=info.min)
            return np.clip(np.rint(dn), info.min, info.max).astype(dtype)
        return np.nan_to_num(dn, nan=0.0).astype(dtype)

    def _products(self, frames: list[Frame], dtype: np.dtype) -> list[np.ndarray]:
        outputs = self.predictor.run([self.predictor.prepare(f) for f in frames])
        out = []
        for frame, values in zip(frames, outputs, strict=True):
            dn = self.to_dn(values, dtype)
            if frame.valid is not None and not frame.valid.all():
                s = self.scale_factor
                invalid = ~np.repeat(np.repeat(frame.valid, s, 0), s, 1)
                dn[:, invalid] = 0
            out.append(dn)
        return out

    def _results(self, tiles: Iterator[tuple[Any, Frame]], dtype: np.dtype
                 ) -> Iterator[tuple[Any, np.ndarray]]:
        pending: list[tuple[Any, Frame]] = []
        for item in tiles:
            pending.append(item)
            if len(pending) == self.batch:
                yield from zip((p for p, _ in pending),
                               self._products([f for _, f in pending], dtype), strict=True)
                pending = []
        if pending:
            yield from zip((p for p, _ in pending),
                           self._products([f for _, f in pending], dtype), strict=True)

    # -- whole scenes, streamed -------------------------------------------------------------

    def stream(self, scene: Scene, errors: list[SceneError] | None = None,
               progress: Callable[[int, int], None] | None = None, block: int = 256
               ) -> tuple[StreamingStitcher, Iterator[np.ndarray]]:
        """The stitcher (for the output's shape) and an iterator of its pieces, which runs the
        model tile by tile as the pieces are pulled (a GeoTIFF writer pulls them)."""
        # A scene smaller than a tile is one tile, padded by the predictor.
        grid = TileGrid(scene.height, scene.width, self.tile, self.overlap)
        dtype = np.dtype(getattr(scene, "dtype", np.uint16))
        stitcher = StreamingStitcher(grid, self.output.channels, dtype, self.scale_factor,
                                     block=block)
        total = len(grid)

        def tiles() -> Iterator[tuple[Any, Frame]]:
            for done, tile in enumerate(iter_tiles(scene, grid.tile, grid.overlap,
                                                   errors=errors), 1):
                yield tile.placement, tile.frame.select(list(self.spec.bands))
                if progress:
                    progress(done, total)

        return stitcher, stitcher.stream(self._results(tiles(), dtype))

    def write_scene(self, scene: Scene, out: Path, *, errors: list[SceneError] | None = None,
                    progress: Callable[[int, int], None] | None = None,
                    extra: dict[str, Any] | None = None) -> Path:
        """Write the super-resolved scene as a tiled zstd GeoTIFF (pixel-interleaved, so it
        streams), georeferenced at the new pixel size."""
        block = 256
        stitcher, pieces = self.stream(scene, errors, progress, block)
        georef = scene.georef
        if georef is not None and self.scale_factor != 1:
            georef = Georef(georef.crs, georef.transform.scaled(self.scale_factor))
        return write_geotiff(out, pieces, list(self.output_bands), georef,
                             shape=stitcher.shape, dtype=stitcher.dtype, tile=block,
                             planar="contig", acquired=scene.acquired,
                             source_id=scene.source_id,
                             extra={"kind": "superres", "scale_factor": self.scale_factor,
                                    **(extra or {})})

    # -- tiles, in memory -------------------------------------------------------------------

    def whole_image(self, frame: Frame) -> np.ndarray:
        """The output DN (the frame's dtype) of one engine run on the whole frame, no tiles:
        the reference a streamed run (:meth:`upsample`, ``onboard predict``) must reproduce."""
        x = self.predictor.prepare(frame)
        return self.to_dn(self.engine.run(x[None])[0], frame.pixels.dtype)

    def upsample(self, frame: Frame) -> Frame:
        """The super-resolved frame (DN, the output bands under the frame's names for them,
        georef at the new pixel size)."""
        h, w = frame.shape
        grid = TileGrid(h, w, self.tile, self.overlap)
        frame = frame.select(list(self.spec.bands))
        stitcher = Stitcher(grid, self.output.channels, frame.pixels.dtype, self.scale_factor)
        tiles = ((placement, replace(frame, pixels=pixels, valid=None if frame.valid is None
                                     else frame.valid[placement.window.slices]))
                 for placement, pixels in tile_array(frame.pixels, grid))
        for placement, dn in self._results(tiles, frame.pixels.dtype):
            stitcher.add(placement, dn)
        s = self.scale_factor
        georef = None if frame.georef is None else Georef(frame.georef.crs,
                                                          frame.georef.transform.scaled(s))
        valid = None if frame.valid is None else np.repeat(np.repeat(frame.valid, s, 0), s, 1)
        # The source's own names for the bands (B02 rather than blue, where it has them).
        return Frame(pixels=stitcher.out, bands=frame.bands[self.first_band:],
                     gsd_m=frame.gsd_m / s,
                     georef=georef, acquired=frame.acquired, source_id=frame.source_id,
                     valid=valid)

    def make_product(self, maker: ProductMaker, scene: Scene, core: Window) -> Product:
        """The ``superres`` product of the tile whose core is ``core``: read with ``halo``
        pixels of context (clamped to the scene), super-resolved, cut back to the core."""
        r0 = max(core.row_off - self.halo, 0)
        c0 = max(core.col_off - self.halo, 0)
        r1 = min(core.row_off + core.height + self.halo, scene.height)
        c1 = min(core.col_off + core.width + self.halo, scene.width)
        frame = scene.read(Window(r0, c0, r1 - r0, c1 - c0), list(self.spec.bands))
        sr = self.upsample(frame)
        s = self.scale_factor
        inner = core.relative_to(Window(r0, c0, r1 - r0, c1 - c0)).scaled(s)
        rows, cols = inner.slices
        georef = None if sr.georef is None else sr.georef.window(inner.col_off, inner.row_off)
        cut = replace(sr, pixels=np.ascontiguousarray(sr.pixels[:, rows, cols]), georef=georef,
                      valid=None if sr.valid is None else sr.valid[rows, cols])
        return maker.make("superres", cut, superres=self.described)


class LazySuperResolver:
    """Opens the ``[superres]`` bundle on first use: a pass that makes no ``superres`` product
    never loads it."""

    def __init__(self, config: SuperResConfig, telemetry: Telemetry | None = None) -> None:
        self.config = config
        self.telemetry = telemetry
        self._resolver: SuperResolver | None = None
        self._output: SuperResOutput | None = None

    @property
    def output(self) -> SuperResOutput:
        """What the bundle makes, from its manifest alone (the engine stays unloaded): what
        the planner sizes superres candidates by."""
        if self._output is None:
            from onboard.runtime.bundle import Bundle

            if self._resolver is not None:
                self._output = self._resolver.described
            else:
                self._output = superres_output(Bundle.open(self.config.bundle).manifest,
                                               self.config.bundle)
        return self._output

    @property
    def resolver(self) -> SuperResolver:
        if self._resolver is None:
            self._resolver = SuperResolver.from_config(self.config, self.telemetry)
            if self.telemetry is not None:
                self.telemetry.emit("superres_opened", bundle=str(self.config.bundle),
                                    backend=self.config.backend)
        return self._resolver

    @property
    def opened(self) -> bool:
        return self._resolver is not None

    def make_product(self, maker: ProductMaker, scene: Scene, core: Window) -> Product:
        return self.resolver.make_product(maker, scene, core)

    def close(self) -> None:
        if self._resolver is not None:
            self._resolver.close()
            self._resolver = None


# ---------------------------------------------------------------------------------------------
# onboard predict, for super-resolution bundles


def is_superres_bundle(path: Path) -> bool:
    """Whether ``path`` is a bundle of task ``superres`` (``onboard predict`` streams those)."""
    from onboard.runtime.bundle import Bundle

    try:
        return Bundle.open(path).manifest.task == "superres"
    except OnboardError:  # an unreadable bundle is for the ordinary path to report
        return False


def predict(args: argparse.Namespace) -> int:
    """``onboard predict SR_BUNDLE INPUT --out OUT.tif``: the super-resolved scene, streamed.

    A folder of per-band GeoTIFFs is opened with just the bundle's bands (the 60 m ones are not
    needed), on its finest grid; a GeoTIFF is named by ``--bands``.
    """
    from onboard.runtime.sources.geotiff import GeoTiffScene
    from onboard.runtime.sources.oscd import OscdScene

    telemetry = Telemetry(args.telemetry) if getattr(args, "telemetry", None) else Telemetry()
    engine = open_engine(args.bundle, args.backend, args.device, threads=args.threads,
                         batch_size=args.batch, telemetry=telemetry,
                         trust=list(getattr(args, "trust", None) or []) or None)
    overlap = max(args.overlap, DEFAULT_OVERLAP)
    try:
        resolver = SuperResolver(engine, scale=args.scale, overlap=overlap, batch=args.batch,
                                 tile=getattr(args, "tile", None))
    except OnboardError:
        engine.close()
        raise
    bands = [b.strip() for b in args.bands.split(",")] if args.bands else None
    if args.input.is_dir():
        scene: Any = OscdScene(args.input, tuple(resolver.spec.bands))
    else:
        scene = GeoTiffScene(args.input, bands=bands)
    errors: list[SceneError] = []

    def progress(done: int, total: int) -> None:
        if sys.stderr.isatty() or done == total:
            print(f"\rtiles {done}/{total}", end="\n" if done == total else "", file=sys.stderr)

    try:
        resolver.write_scene(scene, args.out, errors=errors, progress=progress,
                             extra={"bundle": engine.manifest.name,
                                    "bundle_version": engine.manifest.version,
                                    "bundle_sha256": engine.bundle.sha256})
    finally:
        resolver.close()
        close = getattr(scene, "close", None)
        if close is not None:
            close()
    for error in errors:
        telemetry.emit("tile_error", error=type(error).__name__, message=str(error))
        print(f"onboard predict: warning: {error}", file=sys.stderr)
    s = resolver.scale_factor
    summary = {"out": str(args.out), "tiles_failed": len(errors),
               "bands": ",".join(resolver.output_bands), "scale_factor": s,
               "height": scene.height * s, "width": scene.width * s}
    telemetry.emit("predict_done", **summary)
    for key, value in summary.items():
        print(f"{key}: {value}")
    return 0
