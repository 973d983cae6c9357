"""``onboard uplink …``: stage, verify, activate and roll back bundles and configs.

Ground side: ``split`` (a file into chunks) and ``selftest`` (reference tiles into a bundle).
Board side: ``init``, ``receive``, ``status``, ``verify``, ``activate``, ``rollback``. The
procedure, step by step, is in ``docs/uplink.md``; the work is in :mod:`onboard.runtime.uplink`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

DEFAULT_STATE = Path("onboard-state")


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    def board(name: str, help_text: str) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.add_argument("--state", type=Path, default=DEFAULT_STATE,
                             help=f"the board's state folder (default: ./{DEFAULT_STATE})")
        command.add_argument("--json", action="store_true", help="print the result as JSON")
        return command

    split = sub.add_parser("split", help="ground: cut a bundle or config into uplink chunks")
    split.add_argument("file", type=Path)
    split.add_argument("--chunk-bytes", type=int, required=True,
                       help="payload bytes per chunk (what one pass can carry, less margin)")
    split.add_argument("--out", type=Path, required=True, help="folder for the chunk files")
    split.add_argument("--upload-id", default=None,
                       help="default: the file name and the first 12 hex digits of its SHA-256")

    selftest = sub.add_parser("selftest", help="ground: add reference tiles and the outputs "
                                               "they must give to a bundle")
    selftest.add_argument("bundle", type=Path)
    selftest.add_argument("scene", type=Path, help="a GeoTIFF or an OSCD band folder")
    selftest.add_argument("--tile", action="append", required=True, metavar="ROW,COL,SIZE",
                          help="a reference tile of the scene (repeat for more)")
    selftest.add_argument("--rtol", type=float, default=1e-3)
    selftest.add_argument("--atol", type=float, default=1e-3)
    selftest.add_argument("--min-agreement", type=float, default=1.0,
                          help="fraction of pixels whose class must agree (int8 on another "
                               "engine: e.g. 0.99)")
    selftest.add_argument("--key", type=Path, default=None,
                          help="sign the new bundle with this private key")
    selftest.add_argument("--out", type=Path, required=True)

    init = board("init", "board: set up the uplink state with the golden (factory) config")
    init.add_argument("--golden", type=Path, default=None,
                      help="the factory config (default: the bundled sample)")
    init.add_argument("--trusted-key", type=Path, action="append", default=None,
                      help="public key or folder of keys the board trusts (default: the "
                           "golden config's [signatures])")
    for name, default in (("probation-passes", 2), ("max-failed-fraction", 0.10),
                          ("max-non-finite-fraction", 0.02)):
        init.add_argument(f"--{name}", type=type(default), default=default)
    init.add_argument("--staging-budget-bytes", type=int, default=256 * 2**20)
    init.add_argument("--received-budget-bytes", type=int, default=512 * 2**20)

    receive = board("receive", "board: stage chunk files; assemble what is complete")
    receive.add_argument("chunks", type=Path, nargs="+", help="chunk files or folders of them")
    board("status", "board: uploads (complete, missing chunks), received files, active set")
    verify = board("verify", "board: verify a received bundle or config without switching")
    verify.add_argument("name", help="the received file's name")
    activate = board("activate", "board: verify a received config and its bundles; switch "
                                 "to them at the next pass boundary")
    activate.add_argument("config", help="the received config's name")
    activate.add_argument("--reason", default="")
    rollback = board("rollback", "board: switch back at the next pass boundary")
    rollback.add_argument("--to", choices=("previous", "golden"), default="previous")
    rollback.add_argument("--reason", default="")


def run(args: argparse.Namespace) -> int:
    from onboard.runtime import uplink

    if args.action == "split":
        paths = uplink.split_file(args.file, args.chunk_bytes, args.out, upload=args.upload_id)
        first = uplink.parse_chunk(paths[0].read_bytes())
        print(f"{args.file}: {len(paths)} chunks of at most {args.chunk_bytes} B in {args.out} "
              f"(upload {getattr(first, 'upload', '?')})")
        return 0
    if args.action == "selftest":
        return _selftest(args)
    if args.action == "init":
        from onboard.runtime.pipeline import SAMPLE_CONFIG

        policy = uplink.HealthPolicy(args.probation_passes, args.max_failed_fraction,
                                     args.max_non_finite_fraction)
        board = uplink.Uplink.init(args.state, args.golden or SAMPLE_CONFIG, args.trusted_key,
                                   policy, args.staging_budget_bytes, args.received_budget_bytes)
        return _print(args, board.status(), _status_lines)
    board = uplink.Uplink(args.state)
    if args.action == "receive":
        outcomes = board.receive(args.chunks)
        _print(args, {"outcomes": outcomes, **board.status()}, _receive_lines)
        return 1 if any(o["status"] == "refused" for o in outcomes) else 0
    if args.action == "status":
        return _print(args, board.status(), _status_lines)
    if args.action == "verify":
        return _print(args, board.verify(args.name),
                      lambda r: [f"{args.name}: verified", json.dumps(r, indent=2)])
    if args.action == "activate":
        pending = board.activate(args.config, args.reason)
        return _print(args, pending, lambda p: [
            f"{args.config}: verified; {p['set']['id']} switches in at the next pass boundary",
            *[f"  {b['bundle']} sha256 {b['sha256'][:16]}… signed by {b['key']}"
              for b in p["set"]["bundles"]]])
    pending = board.rollback(args.to, args.reason)
    return _print(args, pending, lambda p: [
        f"rollback to {p['set']['id']} at the next pass boundary ({p['reason']})"])


def _selftest(args: argparse.Namespace) -> int:
    from onboard.runtime.bundle import Bundle
    from onboard.runtime.errors import ConfigError
    from onboard.runtime.sources.oscd import open_scene
    from onboard.runtime.uplink.verify import add_selftest
    from onboard.runtime.windows import Window

    bands = Bundle.open(args.bundle).manifest.input.bands
    scene = open_scene(args.scene)
    tiles = []
    for text in args.tile:
        try:
            row, col, size = (int(v) for v in text.split(","))
        except ValueError:
            raise ConfigError(f"--tile {text!r}: expected ROW,COL,SIZE") from None
        tiles.append(scene.read(Window(row, col, size, size), list(bands)).pixels)
    signer = None
    if args.key is not None:
        from onboard.runtime.bundle.signature import load_signing_key

        signer = load_signing_key(args.key).sign_manifest
    out = add_selftest(args.bundle, tiles, args.out, rtol=args.rtol, atol=args.atol,
                       min_agreement=args.min_agreement, signer=signer)
    print(f"{out}: {len(tiles)} self-test tiles" + (" (signed)" if signer else ""))
    return 0


def _print(args: argparse.Namespace, result: dict[str, Any], lines: Any) -> int:
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        for line in lines(result):
            print(line)
    return 0


def _receive_lines(result: dict[str, Any]) -> list[str]:
    out = []
    for o in result["outcomes"]:
        where = f"{o['upload']} #{o['index']}" if o["index"] is not None else o["source"]
        extra = f": {o['reason']}" if o["reason"] else ""
        if o["status"] == "assembled":
            extra = f": complete, {o['assembled']}"
        if o["status"] != "accepted":
            out.append(f"{o['status']:9s} {where}{extra}")
    accepted = sum(o["status"] == "accepted" for o in result["outcomes"])
    out.append(f"accepted {accepted} chunk(s)")
    return out + _status_lines(result)


def _status_lines(status: dict[str, Any]) -> list[str]:
    lines = []
    for u in status["uploads"]:
        lines.append(f"incomplete {u['name']} (upload {u['upload']}): {u['received']} of "
                     f"{u['total']} chunks; send again: {u['missing_ranges']}")
        for index, reason in u["asked_again"].items():
            lines.append(f"  chunk {index} refused: {reason}")
    for r in status["received"]:
        lines.append(f"complete   {r['name']} ({r['kind']}, {r['bytes']} B, sha256 "
                     f"{r['sha256'][:16]}…)")

    def describe(record: dict[str, Any] | None) -> str:
        if record is None:
            return "none"
        bundles = ", ".join(b["bundle"] for b in record["bundles"])
        return f"{record['id']} [{record['status']}] {record['config']} ({bundles})"

    lines.append(f"active     {describe(status['active'])}")
    lines.append(f"previous   {describe(status['previous'])}")
    pending = status["pending"]
    if pending is not None:
        lines.append(f"pending    {describe(pending['set'])}: {pending['kind']} at the next pass "
                     f"boundary ({pending['reason']})")
    if status["running"] is not None:
        lines.append(f"running    a pass with {status['running']['set']} since "
                     f"{status['running']['started']}")
    return lines
