"""``onboard info PATH``: what a scene, an OSCD city folder or a model bundle holds."""

from __future__ import annotations

import argparse
import json
import zipfile
from pathlib import Path
from typing import Any

from onboard.runtime.bands import common_name
from onboard.runtime.bundle import SUFFIX, Bundle, is_bundle
from onboard.runtime.bundle.signature import read_signature
from onboard.runtime.sources.geotiff import GeoTiffScene
from onboard.runtime.sources.oscd import OscdPair, OscdScene


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", type=Path,
                        help="GeoTIFF, OSCD city folder, band folder or bundle (.onboard)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def describe(path: Path) -> dict[str, Any]:
    if path.suffix == SUFFIX or is_bundle(path):
        return _bundle(path)
    if path.is_dir() and (path / "imgs_1").is_dir():
        pair = OscdPair(path)
        try:
            return {"kind": "oscd-city", "path": str(path),
                    "dates": [_scene(pair.before), _scene(pair.after)],
                    "change_mask": (path / "cm" / f"{path.name}-cm.tif").exists()}
        finally:
            pair.close()
    if path.is_dir():
        scene = OscdScene(path)
        try:
            return {"kind": "band-folder", **_scene(scene)}
        finally:
            scene.close()
    with GeoTiffScene(path) as tif:
        return {"kind": "geotiff", **_scene(tif)}


def _bundle(path: Path) -> dict[str, Any]:
    # Opening verifies every checksum: info on a damaged bundle reports the damage.
    bundle = Bundle.open(path)
    with zipfile.ZipFile(path) as archive:
        sizes = {info.filename: info.file_size for info in archive.infolist()}
    # Who signed it, as the bundle claims; trusting it takes a keyring (`onboard sign --check`).
    signature = read_signature(bundle)
    signed = None if signature is None else {
        "key_name": signature.key_name, "key_id": signature.key_id,
        "created": signature.created, "manifest_sha256": signature.manifest_sha256}
    return {"kind": "bundle", "path": str(path), "bytes": path.stat().st_size,
            "sha256": bundle.sha256, "verified": True, "member_bytes": sizes,
            "signature": signed, "manifest": json.loads(bundle.manifest.to_json())}


def _print_bundle(info: dict[str, Any]) -> None:
    m = info["manifest"]
    inputs = m.get("inputs") or [m["input"]]  # schema 2 lists them; schema 1 has one
    outputs = m.get("outputs") or [m["output"]]
    print(f"path:      {info['path']} ({_mb(info['bytes'])}, checksums verified)")
    print(f"sha256:    {info['sha256']}")
    signed = info.get("signature")
    print("signature: " + (f"by key {signed['key_name']!r} (id {signed['key_id']}), not checked "
                           "here: `onboard sign --check --trust KEY.pub`" if signed
                           else "none (unsigned)"))
    print(f"bundle:    {m['name']} {m['version']}: task {m['task']}, {m['precision']}, "
          f"schema {m['schema_version']}, created {m['created'] or 'unknown'}")
    for spec in inputs:
        name = f" {spec['name']}" if len(inputs) > 1 and "name" in spec else ""
        print(f"input{name}:     {len(spec['bands'])} bands, {spec['dtype']} {spec['layout']}, "
              f"tiles {spec['tile_size']}×{spec['tile_size']} px, trained at "
              f"{spec['gsd_m']:g} m, radiometric offset {spec.get('radiometric_offset', 0):g} DN")
        for band, scale, offset in zip(spec["bands"], spec["scale"], spec["offset"],
                                       strict=True):
            print(f"  {band:<9} model input = DN × {scale:.6g} {'-' if offset < 0 else '+'} "
                  f"{abs(offset):.6g}")
    for out in outputs:
        name = f" {out['name']}" if len(outputs) > 1 and "name" in out else ""
        factor = f", ×{out['scale_factor']} grid" if out["scale_factor"] != 1 else ""
        print(f"output{name}:    {out['kind']}, {out['channels']} channel(s){factor}"
              + (f": {out['description']}" if out["description"] else ""))
        for value, label in out["classes"].items():
            print(f"  {value:>3}  {label}")
    print("engines:")
    for backend, member in m["engines"].items():
        print(f"  {backend:<12} {member} ({_mb(info['member_bytes'].get(member, 0))})")
    for title in ("metrics", "toolchain"):
        if m[title]:
            print(f"{title}:")
            for key, value in m[title].items():
                print(f"  {key:<20} {value:.6g}" if isinstance(value, float)
                      else f"  {key:<20} {value}")
    print("files:")
    for member, digest in m["files"].items():
        print(f"  {member:<20} {_mb(info['member_bytes'].get(member, 0)):>10}  sha256 {digest}")
    if m["extra"]:
        print(f"extra:     {json.dumps(m['extra'])}")


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 100_000 else f"{size} B"


def _scene(scene: GeoTiffScene | OscdScene) -> dict[str, Any]:
    info: dict[str, Any] = {
        "path": scene.source_id,
        "size": {"height": scene.height, "width": scene.width},
        "acquired": scene.acquired.date().isoformat() if scene.acquired else None,
    }
    georef = scene.georef
    info["crs"] = str(georef.crs) if georef and georef.crs else None
    info["bounds"] = georef.bounds(scene.height, scene.width) if georef else None
    if isinstance(scene, OscdScene):
        native = scene.native_gsd_m()
        info["grid_gsd_m"] = round(scene.gsd_m, 2)
        info["bands"] = [
            {"name": b, "common_name": common_name(b), "gsd_m": round(native[b], 2),
             "dtype": str(s.dtype), "file": s.path.name, "layout": _layout(s)}
            for b, s in scene._scenes.items()
        ]
    else:
        info["bands"] = [
            {"name": b, "common_name": common_name(b), "gsd_m": round(scene.gsd_m, 2),
             "dtype": str(scene.dtype)} for b in scene.bands
        ]
        info.update(_layout(scene))
    return info


def _layout(scene: GeoTiffScene) -> dict[str, Any]:
    return {"tiling": f"tiles {scene.tile_shape[0]}×{scene.tile_shape[1]}" if scene.tile_shape
            else f"strips of {scene._seg_h} rows", "compression": scene.compression}


def _print_text(info: dict[str, Any], indent: str = "") -> None:
    if info.get("kind") == "bundle":
        _print_bundle(info)
        return
    if info.get("kind") == "oscd-city":
        print(f"{info['path']}: OSCD city, 2 dates, change mask: "
              f"{'yes' if info['change_mask'] else 'no'}")
        for i, date in enumerate(info["dates"], 1):
            print(f"date {i}:")
            _print_text(date, "  ")
        return
    size = info["size"]
    print(f"{indent}path:     {info['path']}")
    print(f"{indent}size:     {size['width']} × {size['height']} px (width × height)")
    print(f"{indent}acquired: {info['acquired'] or 'unknown'}")
    print(f"{indent}crs:      {info['crs'] or 'none'}")
    if info["bounds"]:
        w, s, e, n = info["bounds"]
        print(f"{indent}bounds:   west {w:.6f}, south {s:.6f}, east {e:.6f}, north {n:.6f}")
    if "grid_gsd_m" in info:
        print(f"{indent}grid:     {info['grid_gsd_m']} m (all bands resampled onto it)")
    else:
        print(f"{indent}layout:   {info['tiling']}, compression {info['compression']}")
    print(f"{indent}bands:    {len(info['bands'])}")
    for band in info["bands"]:
        extra = f"  {band['file']}, {band['layout']['tiling']}, " \
                f"{band['layout']['compression']}" if "file" in band else ""
        print(f"{indent}  {band['name']:<8} {band['common_name']:<9} {band['gsd_m']:>7.2f} m  "
              f"{band['dtype']}{extra}")


def run(args: argparse.Namespace) -> int:
    info = describe(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_text(info)
    return 0
