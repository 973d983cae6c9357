"""``onboard compile MODEL --target T --precision P --out BUNDLE``: the ground compiler.

Thin: parses options and calls :func:`onboard.compile.compile_model`. The compiler (torch,
ONNX, OpenVINO, NNCF) is imported only when the command runs, so the flight runtime, which
imports this module to list its commands, never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from onboard.runtime.errors import CompileError

TARGETS = ("onnxruntime", "openvino", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")
# What the compiler imports for every target (OpenVINO, NNCF and the peers only for some).
COMPILE_MODULES = ("torch", "onnx", "onnxslim")


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="zoo model name (e.g. cloud-4band) or pkg.module:attr "
                        "naming a ZooModel description")
    # Targets and precisions are validated by the compiler, so a wrong one is an onboard error
    # with the same message from the CLI and the Python API.
    parser.add_argument("--target", required=True, help=f"one of {', '.join(TARGETS)}")
    parser.add_argument("--precision", default="fp32", help=f"one of {', '.join(PRECISIONS)}")
    parser.add_argument("--prune", type=float, default=0.0, metavar="RATIO",
                        help="fraction of channels to remove per layer, in [0, 1) (default 0)")
    parser.add_argument("--round-to", type=int, default=None, metavar="N",
                        help="keep pruned channel counts multiples of N (e.g. 16 for AVX-512)")
    parser.add_argument("--max-drop", type=float, default=None, metavar="X",
                        help="largest allowed drop of the model's metric from the fp32 model, in "
                        "the metric's units (0.01 = one point of a 0-1 metric)")
    parser.add_argument("--max-size", type=float, default=None, metavar="MB",
                        help="uplink budget: refuse a bundle larger than this (10^6 bytes)")
    parser.add_argument("--out", type=Path, required=True, help="bundle to write")
    parser.add_argument("--data", type=Path, default=None,
                        help="data root for the model's own data (default $ONBOARD_DATA)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="a state_dict to compile instead of the zoo entry's weights")
    parser.add_argument("--model-class", default=None, metavar="PKG.MODULE:CLASS",
                        help="the network class of --checkpoint (built with no arguments)")
    parser.add_argument("--finetune-epochs", type=int, default=None,
                        help="fine-tune epochs after pruning (default: the zoo entry's, or 3)")
    parser.add_argument("--finetune-lr", type=float, default=None)
    parser.add_argument("--finetune-steps", type=int, default=None,
                        help="at most this many training batches per fine-tune epoch")
    parser.add_argument("--calibration-tiles", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--latency-repeats", type=int, default=20)
    parser.add_argument("--bundle-version", default=None,
                        help="bundle version (default: the zoo entry's)")
    parser.add_argument("--no-verify", action="store_true",
                        help="do not reopen the bundle with the flight runtime to re-measure it")
    parser.add_argument("--sign", type=Path, default=None, metavar="KEY",
                        help="sign the bundle with this Ed25519 private key (NAME.ed25519) once "
                        "the gate and the checks pass; make one with `onboard keys new`")


def require_compile_extra(modules: tuple[str, ...] = COMPILE_MODULES) -> None:
    """Refuse, naming the extra, on an install without the ground compiler (the lean flight
    install has no torch)."""
    missing = []
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise CompileError(
            f"onboard compile needs the [compile] extra ({', '.join(missing)} not installed "
            "here; the flight runtime does not carry them): pip install 'onboard[compile]'")


def run(args: argparse.Namespace) -> int:
    require_compile_extra()
    from onboard.compile import CompileOptions, compile_model, resolve_model

    options = CompileOptions(
        target=args.target, precision=args.precision, prune=args.prune,
        round_to=args.round_to, max_drop=args.max_drop,
        max_size_mb=args.max_size, data_root=args.data, finetune_epochs=args.finetune_epochs,
        finetune_lr=args.finetune_lr, finetune_steps=args.finetune_steps,
        calibration_tiles=args.calibration_tiles, seed=args.seed,
        threads=args.threads, latency_repeats=args.latency_repeats,
        version=args.bundle_version, verify=not args.no_verify, sign_key=args.sign,
    )
    result = compile_model(resolve_model(args.model), args.out, options,
                           checkpoint=args.checkpoint, model_class=args.model_class)
    print(result.report_md.read_text())
    return 0
