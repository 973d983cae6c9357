"""``onboard predict BUNDLE INPUT --out OUT.tif``: one bundle over one scene, tile by tile."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from onboard.runtime.durability import remove_partials
from onboard.runtime.errors import ConfigError
from onboard.runtime.inference import check_scale

BACKENDS = ("onnxruntime", "openvino", "tensorrt")  # preference order for the default
DEFAULT_OVERLAP = 16  # --overlap, in pixels


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
                        "band (e.g. 1 for reflectance input); default: the bundle's; not with "
                        "--reference")
    parser.add_argument("--backend", default=None, choices=list(BACKENDS),
                        help="default: the engine the bundle carries (ONNX Runtime first)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--batch", type=int, default=4, help="tiles per engine call")
    parser.add_argument("--overlap", type=int, default=None,
                        help=f"tile overlap in pixels (default {DEFAULT_OVERLAP}); not with "
                             f"--reference, whose cells are encoded window by window")
    parser.add_argument("--tile", type=int, help="super-resolution bundles: input pixels per "
                        "tile side, at most the bundle's (its default); smaller tiles hold "
                        "less memory, and the overlap still hides the seams")
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
    from onboard.runtime.stages import superres

    is_superres = args.reference is None and superres.is_superres_bundle(args.bundle)
    if args.tile is not None and not is_superres:  # other graphs run at their own tile size
        raise ConfigError(f"--tile is for super-resolution bundles; {args.bundle} runs at its "
                          "own tile size")
    if args.reference is not None:  # change: a score per cell against an earlier scene
        from onboard.runtime.stages import change

        return change.predict(args)
    if is_superres:  # values at a new pixel size, streamed
        return superres.predict(args)
    from onboard.runtime.pipeline import PredictRequest, predict

    request = PredictRequest(
        bundle=args.bundle, input=args.input, out=args.out,
        bands=[b.strip() for b in args.bands.split(",")] if args.bands else None,
        scale=args.scale, backend=args.backend, device=args.device, threads=args.threads,
        batch=args.batch, overlap=args.overlap, png=not args.no_png, telemetry=args.telemetry,
        trust=list(args.trust))

    def progress(done: int, total: int) -> None:
        if sys.stderr.isatty() or done == total:
            print(f"\rtiles {done}/{total}", end="\n" if done == total else "", file=sys.stderr)

    def warn(message: str) -> None:
        print(f"onboard predict: warning: {message}", file=sys.stderr)

    summary = predict(request, progress=progress, warn=warn)
    for key, value in summary.items():
        print(f"{key}: {value}")
    return 0


def _check_options(args: argparse.Namespace) -> None:
    """Refuse what cannot give a trustworthy answer before anything is opened or written."""
    if args.reference is not None:
        # The change path takes the bundle's own input scale and encodes each window on its
        # own: these options would be silently ignored there.
        for option, value in (("--scale", args.scale), ("--overlap", args.overlap)):
            if value is not None:
                raise ConfigError(f"{option} cannot be used with --reference: the change "
                                  f"score uses the bundle's own input scale and encodes each "
                                  f"256-px window without overlap, so {option} would be "
                                  f"ignored; leave it out")
        if args.bands and args.reference.is_dir() and args.input.is_dir():
            raise ConfigError("--bands names a GeoTIFF's bands in file order; --reference "
                              f"{args.reference} and {args.input} are band folders, whose "
                              "files name their bands: leave --bands out")
    if args.overlap is None:
        args.overlap = DEFAULT_OVERLAP
    check_scale(args.scale, "--scale")
    if not 1 <= args.batch <= 1024:
        raise ConfigError(f"--batch must be in [1, 1024] tiles, got {args.batch}")
    if args.threads is not None and not 1 <= args.threads <= 256:
        raise ConfigError(f"--threads must be in [1, 256], got {args.threads}")
    if args.overlap < 0:
        raise ConfigError(f"--overlap must be 0 or more pixels, got {args.overlap}")
    if args.tile is not None and not 16 <= args.tile <= 4096:
        raise ConfigError(f"--tile must be in [16, 4096] pixels, got {args.tile}")
    if args.out.is_dir():
        raise ConfigError(f"--out {args.out}: is a folder; give the output GeoTIFF's path")
    for folder in args.out.parents:  # the first that exists must be a folder
        if folder.exists():
            if not folder.is_dir():
                raise ConfigError(f"--out {args.out}: {folder} is a file, not a folder")
            break
    remove_partials(args.out.parent)  # what a killed earlier run left half-written
