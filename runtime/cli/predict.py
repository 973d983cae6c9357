"""``onboard predict BUNDLE INPUT --out OUT.tif``: one bundle over one scene, tile by tile."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from onboard.runtime.bundle.signature import TrustPolicy
from onboard.runtime.downlink.products import write_geotiff
from onboard.runtime.downlink.quicklook import write_mask_png
from onboard.runtime.durability import remove_partials
from onboard.runtime.engines import open_engine
from onboard.runtime.errors import ConfigError, InvalidPixelsError, SceneError
from onboard.runtime.georef import Georef
from onboard.runtime.inference import NODATA_CLASS, Predictor, check_overlap, check_scale
from onboard.runtime.sources.oscd import open_scene
from onboard.runtime.telemetry import Telemetry

PNG_EDGE = 4096  # the quick-look's longest side, in pixels
BACKENDS = ("onnxruntime", "openvino", "tensorrt")  # preference order for the default


def carried_backend(bundle: Path) -> str:
    """The backend for an engine ``bundle`` carries, ONNX Runtime first; "onnxruntime" when
    the bundle cannot be read here (open_engine then names what is wrong with it)."""
    from onboard.runtime.bundle import Bundle
    from onboard.runtime.errors import OnboardError

    try:
        engines = Bundle.open(bundle).manifest.engines
    except OnboardError:
        return BACKENDS[0]
    return next((b for b in BACKENDS if b in engines), BACKENDS[0])


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", type=Path, help="a verified .onboard bundle")
    parser.add_argument("input", type=Path, help="GeoTIFF scene or folder of per-band GeoTIFFs")
    parser.add_argument("--out", type=Path, required=True, help="output GeoTIFF")
    parser.add_argument("--bands", help="names of the input's bands in file order, comma "
                        "separated (e.g. blue,green,red,nir); default: from the file")
    parser.add_argument("--scale", type=float, help="input value -> model input scale for every "
                        "band (e.g. 1 for reflectance input); default: the bundle's")
    parser.add_argument("--backend", default=None, choices=list(BACKENDS),
                        help="default: the engine the bundle carries (ONNX Runtime first)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--batch", type=int, default=4, help="tiles per engine call")
    parser.add_argument("--overlap", type=int, default=16, help="tile overlap in pixels")
    parser.add_argument("--no-png", action="store_true", help="skip the PNG quick-look")
    parser.add_argument("--telemetry", type=Path, help="append JSON-lines telemetry here")
    parser.add_argument("--reference", type=Path,
                        help="change bundles: the earlier scene (GeoTIFF or band folder) INPUT "
                             "is scored against; writes one float32 score per 32-px cell")
    parser.add_argument("--trust", type=Path, action="append", default=[],
                        help="only load the bundle if signed by this public key (file or "
                             "folder of *.pub; repeatable)")


def run(args: argparse.Namespace) -> int:
    _check_options(args)
    # A bundle that carries only an OpenVINO IR runs on OpenVINO without --backend.
    args.backend = args.backend or carried_backend(args.bundle)
    if args.reference is not None:  # change: a score per cell against an earlier scene
        from onboard.runtime.stages import change

        return change.predict(args)
    from onboard.runtime.stages import superres

    if superres.is_superres_bundle(args.bundle):  # values at a new pixel size, streamed
        return superres.predict(args)
    telemetry = Telemetry(args.telemetry) if args.telemetry else Telemetry()
    bands = [b.strip() for b in args.bands.split(",")] if args.bands else None
    # A band folder names its bands by file; a GeoTIFF may need --bands to name them.
    scene = open_scene(args.input) if args.input.is_dir() else open_scene(args.input, bands)
    engine = open_engine(args.bundle, args.backend, args.device, threads=args.threads,
                         batch_size=args.batch, telemetry=telemetry,
                         trust=TrustPolicy.trusting(*args.trust) if args.trust else None)
    check_overlap(args.overlap, engine.input_spec.tile_size, "--overlap")
    predictor = Predictor(engine, scale=args.scale)
    errors: list[SceneError] = []

    def progress(done: int, total: int) -> None:
        if sys.stderr.isatty() or done == total:
            print(f"\rtiles {done}/{total}", end="\n" if done == total else "", file=sys.stderr)

    product = predictor.predict_scene(scene, args.overlap, args.batch, errors, progress)
    for error in errors:
        telemetry.emit("tile_error", error=type(error).__name__, message=str(error))
        print(f"onboard predict: warning: {error}", file=sys.stderr)
    spec = engine.output_spec
    nodata = _check_outputs(predictor, product, args, telemetry)
    georef = scene.georef
    if georef is not None and spec.scale_factor != 1:
        georef = Georef(georef.crs, georef.transform.scaled(spec.scale_factor))
    classes = spec.kind == "classes"
    names = ["class"] if classes else [f"value{i}" for i in range(product.shape[0])]
    write_geotiff(args.out, product, names, georef, acquired=scene.acquired,
                  source_id=str(args.input),
                  extra={"bundle": engine.manifest.name, "bundle_version": engine.manifest.version,
                         "bundle_sha256": engine.bundle.sha256,
                         "classes": {str(k): v for k, v in spec.classes.items()},
                         "nodata_class": NODATA_CLASS if classes else None,
                         "nodata_fraction": round(nodata, 6),
                         "nonfinite_output_tiles": predictor.checked.tiles})
    summary = {"out": str(args.out), "tiles_failed": len(errors),
               "nodata_fraction": round(nodata, 4),
               "nonfinite_output_tiles": predictor.checked.tiles}
    if classes:
        mask = product[0]
        known = mask != NODATA_CLASS
        for value, name in sorted(spec.classes.items()):
            fraction = float((mask[known] == value).mean()) if known.any() else 0.0
            summary[f"{name}_fraction"] = round(fraction, 4)
        if not args.no_png:
            # A quick-look, not the product: every n-th pixel, at most PNG_EDGE px a side (the
            # full RGB of a 32 768² mask alone is 3 GiB).
            step = max(1, -(-max(mask.shape) // PNG_EDGE))
            summary["png"] = str(write_mask_png(args.out.with_suffix(".png"),
                                                mask[::step, ::step]))
    else:
        summary["min"], summary["max"] = float(np.nanmin(product)), float(np.nanmax(product))
    telemetry.emit("predict_done", **summary)
    for key, value in summary.items():
        print(f"{key}: {value}")
    engine.close()
    return 0


def _check_options(args: argparse.Namespace) -> None:
    """Refuse what cannot give a trustworthy answer before anything is opened or written."""
    check_scale(args.scale, "--scale")
    if not 1 <= args.batch <= 1024:
        raise ConfigError(f"--batch must be in [1, 1024] tiles, got {args.batch}")
    if args.threads is not None and not 1 <= args.threads <= 256:
        raise ConfigError(f"--threads must be in [1, 256], got {args.threads}")
    if args.overlap < 0:
        raise ConfigError(f"--overlap must be 0 or more pixels, got {args.overlap}")
    if args.out.is_dir():
        raise ConfigError(f"--out {args.out}: is a folder; give the output GeoTIFF's path")
    for folder in args.out.parents:  # the first that exists must be a folder
        if folder.exists():
            if not folder.is_dir():
                raise ConfigError(f"--out {args.out}: {folder} is a file, not a folder")
            break
    remove_partials(args.out.parent)  # what a killed earlier run left half-written


def _check_outputs(predictor: Predictor, product: np.ndarray, args: argparse.Namespace,
                   telemetry: Telemetry) -> float:
    """The product's no-data fraction; warns of non-finite model output and refuses a product
    with no usable pixel at all (a mask of nothing but no data is not an answer)."""
    classes = product.dtype == np.uint8
    known = product[0] != NODATA_CLASS if classes else np.isfinite(product).all(axis=0)
    nodata = 1.0 - float(known.mean())
    checked = predictor.checked
    if checked.tiles:
        telemetry.emit("nonfinite_output", tiles=checked.tiles, pixels=checked.pixels,
                       tile_ids=checked.tile_ids, nodata_fraction=round(nodata, 6))
        print(f"onboard predict: warning: the model's output was not finite (NaN or infinite) "
              f"for {checked.pixels} pixels in {checked.tiles} tile(s); they are no data in the "
              f"product", file=sys.stderr)
    if not known.any():
        telemetry.emit("predict_refused", reason="no usable pixel", nodata_fraction=1.0,
                       nonfinite_output_tiles=checked.tiles)
        why = "the model's output was not finite" if checked.tiles else \
            "every input pixel is NaN, infinite, out of range, no data or saturated"
        raise InvalidPixelsError(args.input, f"no usable pixel: {why}; nothing written to "
                                             f"{args.out}")
    return nodata
