"""``onboard predict BUNDLE INPUT --out OUT.tif``: one bundle over one scene, tile by tile."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from onboard.runtime.downlink.products import write_geotiff
from onboard.runtime.downlink.quicklook import write_mask_png
from onboard.runtime.engines import open_engine
from onboard.runtime.errors import SceneError
from onboard.runtime.georef import Georef
from onboard.runtime.inference import NODATA_CLASS, Predictor
from onboard.runtime.sources.oscd import open_scene
from onboard.runtime.telemetry import Telemetry


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", type=Path, help="a verified .onboard bundle")
    parser.add_argument("input", type=Path, help="GeoTIFF scene or folder of per-band GeoTIFFs")
    parser.add_argument("--out", type=Path, required=True, help="output GeoTIFF")
    parser.add_argument("--bands", help="names of the input's bands in file order, comma "
                        "separated (e.g. blue,green,red,nir); default: from the file")
    parser.add_argument("--scale", type=float, help="input value -> model input scale for every "
                        "band (e.g. 1 for reflectance input); default: the bundle's")
    parser.add_argument("--backend", default="onnxruntime",
                        choices=["onnxruntime", "openvino", "tensorrt"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--batch", type=int, default=4, help="tiles per engine call")
    parser.add_argument("--overlap", type=int, default=16, help="tile overlap in pixels")
    parser.add_argument("--no-png", action="store_true", help="skip the PNG quick-look")
    parser.add_argument("--telemetry", type=Path, help="append JSON-lines telemetry here")


def run(args: argparse.Namespace) -> int:
    telemetry = Telemetry(args.telemetry) if args.telemetry else Telemetry()
    bands = [b.strip() for b in args.bands.split(",")] if args.bands else None
    # A band folder names its bands by file; a GeoTIFF may need --bands to name them.
    scene = open_scene(args.input) if args.input.is_dir() else open_scene(args.input, bands)
    engine = open_engine(args.bundle, args.backend, args.device, threads=args.threads,
                         batch_size=args.batch, telemetry=telemetry)
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
                         "nodata_class": NODATA_CLASS if classes else None})
    summary = {"out": str(args.out), "tiles_failed": len(errors)}
    if classes:
        mask = product[0]
        known = mask != NODATA_CLASS
        for value, name in sorted(spec.classes.items()):
            fraction = float((mask[known] == value).mean()) if known.any() else 0.0
            summary[f"{name}_fraction"] = round(fraction, 4)
        if not args.no_png:
            summary["png"] = str(write_mask_png(args.out.with_suffix(".png"), mask))
    else:
        summary["min"], summary["max"] = float(np.nanmin(product)), float(np.nanmax(product))
    telemetry.emit("predict_done", **summary)
    for key, value in summary.items():
        print(f"{key}: {value}")
    engine.close()
    return 0
