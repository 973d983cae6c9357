"""The onboard reference store: int8 latent codes of the last K clear observations of each place.

**Places.** A place is one cell of a fixed global grid of its coordinate reference system, with
the grid's origin at the CRS origin. The grid is a function of the frame alone, its CRS and pixel
size, never of what the store saw before: each axis's pixel size ``p`` is snapped to the nearest
rung of a fixed geometric ladder, ``canonical = anchor × (1 + LADDER_STEP) ** n`` with
``n = floor(log(p / anchor) / log(1 + LADDER_STEP) + 0.5)``, and the cell edge is ``cell_px``
(32) canonical pixels. The anchor is 10 m for projected CRSs (so Sentinel-2's 10 m products sit
on the centre of rung 0) and 10 m / 111 320 m per degree for geographic ones; the step is 5 %.
A frame's cell is keyed by the grid cell that holds its centre, so two passes whose pixel grids
differ by a few pixels, or by a slightly different pixel size on the same rung (hongkong's second
OSCD date is 0.4 % coarser than its first), land on the same keys; a partitioned replay keys a
scene exactly as a sequential run does. Places in different CRSs (two UTM zones) or on different
rungs never match.

*At a rung boundary* (a pixel size half a step, ×1.0247, from a rung) the two frames either side
meet different grids, and their places never match: the ladder is wide so that one place's
passes rarely straddle one. Each of the 18 OSCD cities' two dates (EPSG:4326, 9.2e-5° to
1.16e-4° per pixel) falls on one rung per axis; of the three cities whose dates differ
(abudhabi, hongkong, and saclay_w, whose dates are 1.3 % apart) none comes within 0.9 % of a
boundary. A 2 % or 2.5 % step would split saclay_w; a 2 % one abudhabi too. The price of a
wide rung is that a frame's 32-px cells and its places differ by up to 2.5 % (none at 10 m in
UTM): every 1 / mismatch cells along an axis, two cells fall on one place (the one centred
nearer keeps the reference, both are compared with it) or a place is stepped over. Over the
OSCD frames 0.62 % of cells share a place with another (format 1's grids in one store: 1.03 %).

*What a key compares.* A place's key is a function of the ground alone, but the frame's cells
are not aligned to the places, so the cells two passes put on one place are not the same
ground. Each has its centre inside the place, so their offset is less than one place edge (32
canonical pixels) per axis, and no better than that in general: it is the frames' grid shift
``s`` along the axis modulo the cell edge, as ``r`` or ``r - cell`` (``r = s mod cell``)
depending on where the cells' centres fall in their places. With cell centres mid-place it is
at most half a cell; with centres 1 px inside a place's western edge, a second pass shifted
2 px west keys each cell to the neighbouring place, whose earlier cell lies 30 px (of 32)
away, and the same ground then scores as change. Passes on one pixel grid whose cells start on
the same pixels (Sentinel-2 L1C tiles of one MGRS square, tiled from the same origin) compare
the same ground. Tested in ``tests/test_reference_store.py`` (the keys) and
``tests/test_change_predict.py`` (the scores).

**What a place holds.** Up to K (default 3) references, newest acquisition first: the int8 code
``clip(round(z / latent_scale), -127, 127)`` of its latent and the commit it came from (which
names the scene and its acquisition time), and when the place was last observed (any commit that
saw it, clear or not). Only cells the caller stages as clear become references; a cloudy
observation refreshes ``last seen`` and nothing else, so it never overwrites one.

**On disk** (one folder)::

    manifest.json                   the commit point: ladder, grids, scenes, committed ids, regions
    r<grid>_<rx>_<ry>.<seq>.seg     one segment per region of 64 × 64 places (20 km at 10 m)

A segment is a 24-byte header (magic ``ONBREF01``, places, K, D, flags), then four arrays laid
end to end so each is aligned and read with one ``numpy.frombuffer``: ``last_seen`` uint32 (n),
``seq`` uint32 (n, K; 0 = empty slot), ``local`` uint16 (n; the place's index in its region,
ascending) and ``codes`` int8 (n, K, D), and a CRC-32 of all of it. The manifest holds each
segment's CRC and size: a damaged segment is a :class:`StorageError` naming it, never a wrong
reference. Raw int8 because latents are near-incompressible and a region loads in
microseconds; the payload of a segment is what a place costs.

**Commits.** :meth:`ReferenceStore.stage` collects a scene's cells in memory;
:meth:`ReferenceStore.commit` writes a new segment (a new name: the commit's sequence number) for
every region the scene touched, each atomically and durably through :mod:`durability`, then the
new manifest (the commit point: an atomic rename), then removes the superseded segments. A kill
at any point leaves the previous manifest and every segment it names intact; files no manifest
names are removed on the next open. A scene commits once: its id is remembered (the last 4096
committed ids), so a retried scene adds nothing, and its own references are left out of its
lookups. One process owns a store folder at a time.

**Bounded.** After each commit the store (segments + manifest) is cut to ``budget_bytes``:
whole regions first, least recently observed first (a region's time is the last commit that
observed any of its places; ties by name); the regions of the commit being made go last, and if
they alone exceed the budget their places go least recently observed first. An evicted place is
new again when next seen.

**Size.** A place costs ``6 + K × (D + 4)`` bytes: 2 (local index) + 4 (last seen) + K × (D
code bytes + 4 commit number); plus 28 bytes per segment and about 200 bytes of manifest per
region (64 × 64 places), under 0.1 byte per place. The change bundles 0.2 (D = 128: 16
sub-cells × 8) at K = 3: 402 bytes per place. A 1000 × 1000 km area of interest at 10 m holds
(10⁶ m / 320 m)² = 9.77 million places: 3.93 GB at D = 128, K = 3 (1.35 GB at K = 1; 1.11 GB
at D = 32, K = 3, version 0.1's latent; ``bytes_for_area`` computes it for any D and K).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import struct
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from onboard.runtime.durability import remove_partials, write_bytes, write_text
from onboard.runtime.errors import ConfigError, GeoreferenceError, ShapeError, StorageError
from onboard.runtime.georef import Georef

# Format 2: grids on the fixed ladder. Format 1 founded a grid per resolution from the first frame
# that needed it, so its places cannot be reached from format 2's keys.
FORMAT = "onboard-reference/2"
MANIFEST = "manifest.json"
SEGMENT_MAGIC = b"ONBREF01"
_HEADER = struct.Struct("<8sIHHII")  # magic, places, K, D, flags, reserved: 24 bytes
_CRC = struct.Struct("<I")
REGION_EDGE = 64  # places per region edge: 4096 places, a segment of ~860 KB at D=64, K=3
COMMITTED_KEPT = 4096  # committed scene ids remembered for idempotence
LADDER_STEP = 0.05  # relative step between the canonical pixel sizes of one CRS
PROJECTED_ANCHOR = 10.0  # CRS units (metres) per pixel on rung 0 of a projected CRS
GEOGRAPHIC_ANCHOR = 10.0 / 111_320.0  # degrees per pixel on rung 0: 10 m of a degree of latitude
MAX_GRIDS = 255
_AXIS_BITS = 27  # |cell index| < 2**27 on each axis: 43 000 km of 320 m cells
_SEGMENT_NAME = re.compile(r"^r(\d+)_(-?\d+)_(-?\d+)\.(\d+)\.seg$")
_MANIFEST_BYTES_PER_REGION = 200  # the budget's estimate before the manifest is serialised

Region = tuple[int, int, int]  # (grid id, rx, ry)


def bytes_per_place(dim: int, k: int) -> int:
    """What one place costs in a segment: local index, last seen, K × (code + commit)."""
    return 2 + 4 + k * (dim + 4)


def bytes_for_area(km_x: float, km_y: float, *, dim: int, k: int = 3, gsd_m: float = 10.0,
                   cell_px: int = 32) -> int:
    """Bytes the store needs to hold every place of a ``km_x`` × ``km_y`` area."""
    cell_m = gsd_m * cell_px
    places = math.ceil(km_x * 1000 / cell_m) * math.ceil(km_y * 1000 / cell_m)
    regions = math.ceil(places / REGION_EDGE**2)
    return places * bytes_per_place(dim, k) + regions * (
        _HEADER.size + _CRC.size + _MANIFEST_BYTES_PER_REGION)


def ladder_rung(pixel_size: float, geographic: bool) -> int:
    """The rung of the canonical pixel size nearest ``pixel_size`` (CRS units per pixel)."""
    anchor = GEOGRAPHIC_ANCHOR if geographic else PROJECTED_ANCHOR
    return math.floor(math.log(pixel_size / anchor) / math.log1p(LADDER_STEP) + 0.5)


def canonical_pixel(rung: int, geographic: bool) -> float:
    """The canonical pixel size of ``rung``, in CRS units."""
    anchor = GEOGRAPHIC_ANCHOR if geographic else PROJECTED_ANCHOR
    return anchor * (1.0 + LADDER_STEP) ** rung


def _ladder() -> dict[str, float]:
    return {"step": LADDER_STEP, "projected_anchor": PROJECTED_ANCHOR,
            "geographic_anchor": GEOGRAPHIC_ANCHOR}


@dataclass(frozen=True)
class CellGrid:
    """One global grid of places: a CRS at one rung per axis, origin at the CRS origin. ``id``
    is the store's own handle (the order the store first met its grids); the place a key
    names is ``(crs, rung_x, rung_y, gx, gy)``, the same in every store."""

    id: int
    crs: str
    cell_x: float  # cell edge in CRS units: cell_px canonical pixels of rung_x
    cell_y: float
    rung_x: int
    rung_y: int

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "crs": self.crs, "rung_x": self.rung_x, "rung_y": self.rung_y,
                "cell_x": self.cell_x, "cell_y": self.cell_y}


@dataclass
class CellKeys:
    """The places of some cells: grid id and cell indices, and how far each cell's centre is
    from its place's centre (in cells; 0 = centred), which breaks ties when two cells of one
    scene fall on one place."""

    grid: np.ndarray  # int64 (n,)
    gx: np.ndarray  # int64 (n,), eastward
    gy: np.ndarray  # int64 (n,), northward
    offset: np.ndarray  # float64 (n,)

    def __len__(self) -> int:
        return len(self.gx)

    def packed(self) -> np.ndarray:
        """One int64 per place (grid, gy, gx), for sets and sorting."""
        half = np.int64(1 << _AXIS_BITS)
        return (self.grid << 56) | ((self.gy + half) << 28) | (self.gx + half)

    def subset(self, index: np.ndarray) -> CellKeys:
        return CellKeys(self.grid[index], self.gx[index], self.gy[index], self.offset[index])


def _unpack(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(grid, gy, gx) of packed places, or (grid, ry, rx) of packed regions."""
    half = np.int64(1 << _AXIS_BITS)
    mask = np.int64((1 << 28) - 1)
    return packed >> 56, ((packed >> 28) & mask) - half, (packed & mask) - half


def _regions_and_locals(grid: np.ndarray, gx: np.ndarray, gy: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Packed region ids (grid, ry, rx) and each place's index inside its region."""
    shift = int(np.log2(REGION_EDGE))
    rx, ry = gx >> shift, gy >> shift
    local = ((gy & (REGION_EDGE - 1)) * REGION_EDGE + (gx & (REGION_EDGE - 1))).astype(np.uint16)
    half = np.int64(1 << _AXIS_BITS)
    return (grid << 56) | ((ry + half) << 28) | (rx + half), local


def _places_of(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    grid, gy, gx = _unpack(packed)
    return _regions_and_locals(grid, gx, gy)


def _region_of(packed_region: int) -> Region:
    g, ry, rx = (int(v[0]) for v in _unpack(np.array([packed_region], np.int64)))
    return (g, rx, ry)


def _region_name(region: Region) -> str:
    return f"{region[0]}_{region[1]}_{region[2]}"


@dataclass
class Memory:
    """What the store holds for some places: ``codes`` (n, K, D) int8, ``present`` (n, K)
    which slots hold a reference (newest first), ``seq`` (n, K) the commit of each."""

    codes: np.ndarray
    present: np.ndarray
    seq: np.ndarray

    @property
    def known(self) -> np.ndarray:
        """Places with at least one reference; the others are new."""
        return self.present.any(axis=1)


@dataclass
class CommitResult:
    scene: str
    committed: bool  # False: the scene was committed before, nothing changed
    places_added: int = 0
    references_added: int = 0
    observed: int = 0  # places seen, clear or not, that the store holds
    evicted_regions: int = 0
    evicted_places: int = 0
    bytes: int = 0


class _Segment:
    """One region's places, as loaded (never changed in place: a commit builds a new one)."""

    def __init__(self, local: np.ndarray, last_seen: np.ndarray, seq: np.ndarray,
                 codes: np.ndarray) -> None:
        self.local, self.last_seen, self.seq, self.codes = local, last_seen, seq, codes
        self.row_of = np.full(REGION_EDGE * REGION_EDGE, -1, np.int32)
        self.row_of[local] = np.arange(len(local), dtype=np.int32)

    @classmethod
    def empty(cls, k: int, dim: int) -> _Segment:
        return cls(np.zeros(0, np.uint16), np.zeros(0, np.uint32), np.zeros((0, k), np.uint32),
                   np.zeros((0, k, dim), np.int8))

    def __len__(self) -> int:
        return len(self.local)

    @property
    def nbytes(self) -> int:
        return _HEADER.size + _CRC.size + sum(a.nbytes for a in (
            self.local, self.last_seen, self.seq, self.codes))

    def to_bytes(self) -> bytes:
        n, k, dim = self.codes.shape
        parts = [_HEADER.pack(SEGMENT_MAGIC, n, k, dim, 0, 0),
                 np.ascontiguousarray(self.last_seen, "<u4").tobytes(),
                 np.ascontiguousarray(self.seq, "<u4").tobytes(),
                 np.ascontiguousarray(self.local, "<u2").tobytes(),
                 np.ascontiguousarray(self.codes, np.int8).tobytes()]
        body = b"".join(parts)
        return body + _CRC.pack(zlib.crc32(body))

    @classmethod
    def from_bytes(cls, data: bytes, path: Path, k: int, dim: int) -> _Segment:
        if len(data) < _HEADER.size + _CRC.size:
            raise StorageError(path, f"reference segment is truncated ({len(data)} bytes)")
        (crc,) = _CRC.unpack_from(data, len(data) - _CRC.size)
        if zlib.crc32(memoryview(data)[: -_CRC.size]) != crc:
            raise StorageError(path, "reference segment is damaged: CRC-32 mismatch")
        magic, n, seg_k, seg_dim, _, _ = _HEADER.unpack_from(data)
        if magic != SEGMENT_MAGIC:
            raise StorageError(path, f"not a reference segment (magic {magic!r})")
        if (seg_k, seg_dim) != (k, dim):
            raise StorageError(path, f"segment holds K={seg_k}, D={seg_dim}; the store has K={k}, "
                                     f"D={dim}")
        expected = _HEADER.size + n * (4 + 4 * k + 2 + k * dim) + _CRC.size
        if len(data) != expected:
            raise StorageError(path, f"reference segment is {len(data)} bytes, its header says "
                                     f"{expected}")
        at = _HEADER.size
        last_seen = np.frombuffer(data, "<u4", n, at)
        at += 4 * n
        seq = np.frombuffer(data, "<u4", n * k, at).reshape(n, k)
        at += 4 * n * k
        local = np.frombuffer(data, "<u2", n, at)
        at += 2 * n
        codes = np.frombuffer(data, np.int8, n * k * dim, at).reshape(n, k, dim)
        if n > 1 and not (np.diff(local.astype(np.int32)) > 0).all():
            raise StorageError(path, "reference segment's places are not in ascending order")
        return cls(local, last_seen, seq, codes)


@dataclass
class _Staged:
    """One scene's cells, collected batch by batch until its commit."""

    acquired: datetime | None
    clear_keys: list[np.ndarray] = field(default_factory=list)  # packed
    clear_offsets: list[np.ndarray] = field(default_factory=list)
    clear_codes: list[np.ndarray] = field(default_factory=list)
    seen_keys: list[np.ndarray] = field(default_factory=list)


def _epoch(moment: datetime | None) -> float | None:
    if moment is None:
        return None
    aware = moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
    return aware.timestamp()


class ReferenceStore:
    """The reference store in folder ``path`` (created at the first commit).

    ``dim`` is the latent length (int8 codes), ``k`` the references kept per place, ``model``
    what made the codes: codes of another model are meaningless, so a store made by one model
    (or with another K or D) is refused with a :class:`ConfigError` naming it.
    """

    def __init__(self, path: str | Path, *, dim: int, k: int = 3, model: str = "",
                 budget_bytes: int = 256 * 2**20, cell_px: int = 32,
                 cache_bytes: int = 64 * 2**20) -> None:
        if not 1 <= dim <= 4096:
            raise ConfigError(f"{path}: latent length must be in [1, 4096], got {dim}")
        if not 1 <= k <= 64:
            raise ConfigError(f"{path}: K must be in [1, 64], got {k}")
        if cell_px < 1:
            raise ConfigError(f"{path}: cell_px must be positive, got {cell_px}")
        if budget_bytes < 4096:
            raise ConfigError(f"{path}: budget_bytes must be at least 4096, got {budget_bytes}")
        self.path = Path(path)
        self.dim, self.k, self.model, self.cell_px = dim, k, model, cell_px
        self.budget_bytes = budget_bytes
        self.cache_bytes = cache_bytes
        self.sequence = 0  # the last commit's number
        self.grids: list[CellGrid] = []
        self.scenes: dict[int, dict[str, Any]] = {}  # seq -> {"id", "t"} still referenced
        self.committed: OrderedDict[str, int] = OrderedDict()  # scene id -> seq
        self.regions: dict[Region, dict[str, Any]] = {}  # -> {"file", "crc32", "bytes", ...}
        self._cache: OrderedDict[Region, _Segment] = OrderedDict()
        self._cached_bytes = 0
        self._staged: dict[str, _Staged] = {}
        self._damaged: set[Region] = set()
        self._open()

    # -- opening ---------------------------------------------------------------------------------

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def _open(self) -> None:
        if not self.manifest_path.exists():
            self._remove_unreferenced()
            return
        try:
            data = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as error:
            raise StorageError(self.manifest_path, f"cannot read the reference store's "
                                                   f"manifest: {error}") from error
        except ValueError as error:
            raise StorageError(self.manifest_path, f"the reference store's manifest is not "
                                                   f"valid JSON: {error}") from error
        try:
            if data.get("format") == "onboard-reference/1":
                raise StorageError(self.manifest_path, "reference store of format 1, whose "
                                   "grids were founded by the first frame at each resolution; "
                                   f"this runtime reads {FORMAT} (grids on a fixed ladder of "
                                   "pixel sizes), whose places differ: remove the store folder "
                                   "or give the stage another store path")
            if data.get("format") != FORMAT:
                raise StorageError(self.manifest_path, f"not a reference store manifest "
                                                       f"(format {data.get('format')!r})")
            stored = (int(data["dim"]), int(data["k"]), str(data["model"]),
                      int(data["cell_px"]))
            ladder = {name: float(value) for name, value in data["ladder"].items()}
            if ladder != _ladder():
                raise StorageError(self.manifest_path, f"reference store keyed on the ladder "
                                                       f"{ladder}, this runtime's is {_ladder()}: "
                                                       f"its places differ; remove the store "
                                                       f"folder or give the stage another path")
            self.sequence = int(data["sequence"])
            self.grids = [CellGrid(int(g["id"]), str(g["crs"]), float(g["cell_x"]),
                                   float(g["cell_y"]), int(g["rung_x"]), int(g["rung_y"]))
                          for g in data["grids"]]
            if [g.id for g in self.grids] != list(range(len(self.grids))):
                raise StorageError(self.manifest_path, "the reference store's grids are not "
                                                       "numbered 0, 1, 2, ...")
            self.scenes = {int(seq): {"id": str(s["id"]), "t": float(s["t"])}
                           for seq, s in data["scenes"].items()}
            self.committed = OrderedDict((str(scene), int(seq))
                                         for scene, seq in data["committed"])
            for name, entry in data["regions"].items():
                grid, rx, ry = (int(v) for v in name.split("_"))
                self.regions[(grid, rx, ry)] = {
                    "file": str(entry["file"]), "crc32": int(entry["crc32"]),
                    "bytes": int(entry["bytes"]), "places": int(entry["places"]),
                    "last_seen": int(entry["last_seen"]),
                    "scenes": [int(s) for s in entry["scenes"]]}
        except StorageError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise StorageError(self.manifest_path, f"the reference store's manifest is "
                                                   f"malformed: {type(error).__name__}: "
                                                   f"{error}") from error
        wanted = (self.dim, self.k, self.model, self.cell_px)
        if stored != wanted:
            raise ConfigError(
                f"{self.path}: this reference store holds D={stored[0]}, K={stored[1]}, model "
                f"{stored[2]!r}, {stored[3]} px cells; the stage asks for D={wanted[0]}, "
                f"K={wanted[1]}, model {wanted[2]!r}, {wanted[3]} px cells. References of "
                f"another model or layout cannot be compared: give the stage another store "
                f"path or remove this one")
        self._remove_unreferenced()

    def _remove_unreferenced(self) -> None:
        """What a killed commit left: partial files and segments no manifest names."""
        if not self.path.is_dir():
            return
        remove_partials(self.path)
        named = {entry["file"] for entry in self.regions.values()}
        for entry in self.path.iterdir():
            if _SEGMENT_NAME.match(entry.name) and entry.name not in named:
                with contextlib.suppress(OSError):
                    entry.unlink()

    # -- places ----------------------------------------------------------------------------------

    def grid_for(self, georef: Georef) -> CellGrid:
        """The grid of ``georef``: its CRS, and per axis the ladder rung nearest its pixel size
        (see the module docstring). A grid the store has not met yet gets the next id, in
        memory; it is kept with the first commit that uses it."""
        t = georef.transform
        if not t.is_rectilinear:
            raise GeoreferenceError(None, f"the reference store needs a north-up transform, got "
                                          f"{t}")
        if georef.crs is None:
            raise GeoreferenceError(None, "the reference store needs a CRS to key places")
        if not (math.isfinite(t.a) and math.isfinite(t.e) and t.a and t.e):
            raise GeoreferenceError(None, f"the reference store needs a finite, non-zero pixel "
                                          f"size, got {t}")
        crs, geographic = str(georef.crs), bool(georef.crs.geographic)
        rung_x, rung_y = ladder_rung(abs(t.a), geographic), ladder_rung(abs(t.e), geographic)
        for grid in self.grids:
            if (grid.crs, grid.rung_x, grid.rung_y) == (crs, rung_x, rung_y):
                return grid
        if len(self.grids) >= MAX_GRIDS:
            raise GeoreferenceError(None, f"{self.path}: the reference store already has "
                                          f"{MAX_GRIDS} grids")
        grid = CellGrid(len(self.grids), crs, canonical_pixel(rung_x, geographic) * self.cell_px,
                        canonical_pixel(rung_y, geographic) * self.cell_px, rung_x, rung_y)
        self.grids.append(grid)
        return grid

    def keys(self, georef: Georef, cols: np.ndarray, rows: np.ndarray) -> CellKeys:
        """The places of cells centred at pixel (``cols``, ``rows``) of a frame on
        ``georef``."""
        grid = self.grid_for(georef)
        t = georef.transform
        x = t.a * np.asarray(cols, np.float64) + t.c
        y = t.e * np.asarray(rows, np.float64) + t.f
        fx, fy = x / grid.cell_x, y / grid.cell_y
        gx, gy = np.floor(fx).astype(np.int64), np.floor(fy).astype(np.int64)
        limit = 1 << _AXIS_BITS
        if len(gx) and (np.abs(gx).max() >= limit or np.abs(gy).max() >= limit):
            raise GeoreferenceError(None, f"cells beyond ±{limit} cells of the CRS origin")
        offset = np.abs(fx - gx - 0.5) + np.abs(fy - gy - 0.5)
        return CellKeys(np.full(len(gx), grid.id, np.int64), gx, gy, offset)

    # -- reading ---------------------------------------------------------------------------------

    def _segment(self, region: Region) -> _Segment:
        cached = self._cache.get(region)
        if cached is not None:
            self._cache.move_to_end(region)
            return cached
        entry = self.regions.get(region)
        if entry is None or region in self._damaged:
            return _Segment.empty(self.k, self.dim)
        path = self.path / entry["file"]
        try:
            data = path.read_bytes()
        except OSError as error:
            raise StorageError(path, f"cannot read reference segment: "
                                     f"{error.strerror or error}") from error
        if len(data) != entry["bytes"]:
            raise StorageError(path, f"reference segment is {len(data)} bytes, the manifest says "
                                     f"{entry['bytes']}")
        segment = _Segment.from_bytes(data, path, self.k, self.dim)
        if _CRC.unpack_from(data, len(data) - _CRC.size)[0] != entry["crc32"]:
            raise StorageError(path, "reference segment is not the one the manifest names "
                                     "(CRC-32 differs)")
        self._cache[region] = segment
        self._cached_bytes += segment.nbytes
        while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= old.nbytes
        return segment

    def forget_damaged(self, region: Region) -> None:
        """Treat a region whose segment cannot be read as empty: its places are new, and the
        next commit that touches it writes it afresh (the damaged file is then removed)."""
        self._damaged.add(region)
        self._cache.pop(region, None)

    def forget_unreadable(self, keys: CellKeys) -> list[StorageError]:
        """Read the segment of every region ``keys`` touch, and forget (:meth:`forget_damaged`)
        those that cannot be read: damaged, truncated or missing. Returns their errors, each
        naming its file; the regions that read back keep their references."""
        errors: list[StorageError] = []
        if not len(keys):
            return errors
        regions, _ = _regions_and_locals(keys.grid, keys.gx, keys.gy)
        for packed in np.unique(regions):
            region = _region_of(int(packed))
            try:
                self._segment(region)
            except StorageError as error:
                self.forget_damaged(region)
                errors.append(error)
        return errors

    def region_of(self, keys: CellKeys, index: int) -> Region:
        regions, _ = _regions_and_locals(keys.grid[index:index + 1], keys.gx[index:index + 1],
                                         keys.gy[index:index + 1])
        return _region_of(int(regions[0]))

    def lookup(self, keys: CellKeys, exclude_scene: str | None = None) -> Memory:
        """The references of each place, newest first; ``exclude_scene``'s own references (a
        scene run again after its commit) are left out."""
        n = len(keys)
        codes = np.zeros((n, self.k, self.dim), np.int8)
        seq = np.zeros((n, self.k), np.uint32)
        if n:
            regions, local = _regions_and_locals(keys.grid, keys.gx, keys.gy)
            for packed in np.unique(regions):
                at = np.flatnonzero(regions == packed)
                segment = self._segment(_region_of(int(packed)))
                if not len(segment):
                    continue
                rows = segment.row_of[local[at]]
                hit = rows >= 0
                codes[at[hit]] = segment.codes[rows[hit]]
                seq[at[hit]] = segment.seq[rows[hit]]
        present = seq != 0
        own = self.committed.get(exclude_scene) if exclude_scene is not None else None
        if own is not None:
            present &= seq != own
        return Memory(codes, present, seq)

    def scene_of(self, seq: int) -> str:
        """The scene id of commit ``seq``."""
        return self.scenes[int(seq)]["id"]

    # -- staging and committing ------------------------------------------------------------------

    def is_committed(self, scene: str) -> bool:
        return scene in self.committed

    def stage(self, scene: str, acquired: datetime | None, keys: CellKeys, codes: np.ndarray,
              clear: np.ndarray) -> None:
        """Collect cells of ``scene`` for its commit: ``codes`` (n, D) int8, ``clear`` (n,)
        bool. Every cell refreshes its place's ``last seen``; only clear ones become
        references. A scene committed before stages nothing."""
        if scene in self.committed:
            return
        codes = np.asarray(codes)
        clear = np.asarray(clear, bool)
        if codes.shape != (len(keys), self.dim) or codes.dtype != np.int8:
            raise ShapeError(f"{self.path}: codes must be int8 ({len(keys)}, {self.dim}), got "
                             f"{codes.dtype} {codes.shape}")
        if clear.shape != (len(keys),):
            raise ShapeError(f"{self.path}: clear must be ({len(keys)},), got {clear.shape}")
        staged = self._staged.setdefault(scene, _Staged(acquired))
        packed = keys.packed()
        staged.seen_keys.append(packed)
        staged.clear_keys.append(packed[clear])
        staged.clear_offsets.append(keys.offset[clear])
        staged.clear_codes.append(codes[clear])

    def discard(self, scene: str) -> None:
        """Forget what was staged for ``scene`` (an acquisition that did not finish)."""
        self._staged.pop(scene, None)

    def commit(self, scene: str) -> CommitResult:
        """Make ``scene``'s staged cells references, durably, once per scene id."""
        staged = self._staged.pop(scene, None)
        if scene in self.committed:
            return CommitResult(scene, False, bytes=self.nbytes)
        if staged is None:
            staged = _Staged(None)
        seq = self.sequence + 1
        t = _epoch(staged.acquired)
        if t is None:  # undated: newer than every dated reference it meets
            t = max([s["t"] for s in self.scenes.values()] + [0.0]) + 1.0
        times = {s: info["t"] for s, info in self.scenes.items()}
        times[seq] = t

        clear_keys = np.concatenate(staged.clear_keys) if staged.clear_keys else \
            np.zeros(0, np.int64)
        clear_offsets = np.concatenate(staged.clear_offsets) if staged.clear_offsets else \
            np.zeros(0)
        clear_codes = np.concatenate(staged.clear_codes) if staged.clear_codes else \
            np.zeros((0, self.dim), np.int8)
        # Two cells of one scene on one place: the one centred nearer the place wins.
        order = np.lexsort((clear_offsets, clear_keys))
        clear_keys, clear_codes = clear_keys[order], clear_codes[order]
        first = np.ones(len(clear_keys), bool)
        first[1:] = clear_keys[1:] != clear_keys[:-1]
        clear_keys, clear_codes = clear_keys[first], clear_codes[first]
        seen = np.unique(np.concatenate(staged.seen_keys)) if staged.seen_keys else \
            np.zeros(0, np.int64)

        result = CommitResult(scene, True)
        written: dict[Region, _Segment] = {}
        observed_only: list[Region] = []
        c_regions, c_local = _places_of(clear_keys)
        s_regions, s_local = _places_of(seen)
        for packed in np.unique(np.concatenate([c_regions, s_regions])):
            region = _region_of(int(packed))
            old = self._segment(region)
            at_clear = c_regions == packed
            at_seen = s_regions == packed
            segment, added, refs, observed = self._merge(
                old, c_local[at_clear], clear_codes[at_clear], s_local[at_seen], seq, times)
            result.places_added += added
            result.references_added += refs
            result.observed += observed
            if added or refs:
                written[region] = segment
            elif observed:
                observed_only.append(region)

        new_regions = dict(self.regions)
        for region, segment in written.items():
            new_regions[region] = self._entry(region, segment, seq)
        # A region only seen under cloud keeps its segment; the manifest notes the observation
        # (the region's eviction time), so cloudy passes cost no segment writes.
        for region in observed_only:
            new_regions[region] = {**new_regions[region], "last_seen": seq}
        evicted_regions, evicted_places = self._evict(new_regions, written, seq)
        result.evicted_regions, result.evicted_places = evicted_regions, evicted_places

        committed = OrderedDict(self.committed)
        committed[scene] = seq
        while len(committed) > COMMITTED_KEPT:
            committed.popitem(last=False)
        referenced = {s for entry in new_regions.values() for s in entry["scenes"]}
        scenes = {s: info for s, info in self.scenes.items() if s in referenced}
        if seq in referenced:
            scenes[seq] = {"id": scene, "t": t}

        # The commit: every new segment durable first, then the manifest names them.
        for region, segment in written.items():
            if region in new_regions and new_regions[region]["file"].endswith(f".{seq}.seg"):
                write_bytes(self.path / new_regions[region]["file"], segment.to_bytes())
        manifest = {"format": FORMAT, "dim": self.dim, "k": self.k, "model": self.model,
                    "cell_px": self.cell_px, "region_edge": REGION_EDGE, "ladder": _ladder(),
                    "sequence": seq,
                    "grids": [g.to_dict() for g in self.grids],
                    "scenes": {str(s): info for s, info in sorted(scenes.items())},
                    "committed": [[s, q] for s, q in committed.items()],
                    "regions": {_region_name(r): e for r, e in sorted(new_regions.items())}}
        write_text(self.manifest_path, json.dumps(manifest, separators=(",", ":")) + "\n")

        superseded = [self.regions[r]["file"] for r in self.regions
                      if r not in new_regions or new_regions[r]["file"] != self.regions[r]["file"]]
        self.sequence, self.regions, self.committed, self.scenes = \
            seq, new_regions, committed, scenes
        for region in list(self._cache):
            if region in written or region not in new_regions:
                old = self._cache.pop(region)
                self._cached_bytes -= old.nbytes
        self._damaged -= set(written)
        for name in superseded:
            with contextlib.suppress(OSError):
                (self.path / name).unlink()
        result.bytes = self.nbytes
        return result

    def _merge(self, old: _Segment, clear_local: np.ndarray, clear_codes: np.ndarray,
               seen_local: np.ndarray, seq: int, times: dict[int, float]
               ) -> tuple[_Segment, int, int, int]:
        """``old`` with the scene's references and observations; (segment, places added,
        references added, places observed)."""
        local = np.union1d(old.local, clear_local).astype(np.uint16)
        n = len(local)
        rows_old = np.searchsorted(local, old.local)
        last_seen = np.zeros(n, np.uint32)
        slots_seq = np.zeros((n, self.k + 1), np.uint32)
        slots_codes = np.zeros((n, self.k + 1, self.dim), np.int8)
        last_seen[rows_old] = old.last_seen
        slots_seq[rows_old, : self.k] = old.seq
        slots_codes[rows_old, : self.k] = old.codes
        rows_clear = np.searchsorted(local, clear_local)
        slots_seq[rows_clear, self.k] = seq
        slots_codes[rows_clear, self.k] = clear_codes
        rows_seen = np.searchsorted(local, seen_local)
        held = (rows_seen < n) & (local[np.minimum(rows_seen, n - 1)] == seen_local) \
            if n else np.zeros(len(seen_local), bool)
        last_seen[rows_seen[held]] = seq
        last_seen[rows_clear] = seq
        # Newest acquisition first; an empty slot sorts last; the newest K stay.
        known = np.array(sorted(times), np.int64)
        when = np.array([times[int(s)] for s in known], np.float64)
        key = np.full(slots_seq.shape, -np.inf)
        filled = slots_seq != 0
        key[filled] = when[np.searchsorted(known, slots_seq[filled])]
        # Ties in time: the later commit first.
        order = np.lexsort((-slots_seq.astype(np.int64), -key), axis=-1)[:, : self.k]
        seq_kept = np.take_along_axis(slots_seq, order, axis=1)
        codes_kept = np.take_along_axis(slots_codes, order[:, :, None], axis=1)
        segment = _Segment(local, last_seen, np.ascontiguousarray(seq_kept),
                           np.ascontiguousarray(codes_kept))
        return segment, n - len(old), len(clear_local), int(held.sum())

    def _entry(self, region: Region, segment: _Segment, seq: int) -> dict[str, Any]:
        data = segment.to_bytes()
        return {"file": f"r{_region_name(region)}.{seq}.seg",
                "crc32": _CRC.unpack_from(data, len(data) - _CRC.size)[0],
                "bytes": len(data), "places": len(segment),
                "last_seen": int(segment.last_seen.max()) if len(segment) else seq,
                "scenes": sorted({int(s) for s in np.unique(segment.seq) if s})}

    def _evict(self, regions: dict[Region, dict[str, Any]], written: dict[Region, _Segment],
               seq: int) -> tuple[int, int]:
        """Cut ``regions`` (in place) to the budget: see the module docstring."""
        def total() -> int:
            return sum(e["bytes"] for e in regions.values()) + 1024 + \
                _MANIFEST_BYTES_PER_REGION * len(regions)

        evicted_regions = evicted_places = 0
        if total() <= self.budget_bytes:
            return 0, 0
        others = sorted((r for r in regions if r not in written),
                        key=lambda r: (regions[r]["last_seen"], r))
        for region in others:
            if total() <= self.budget_bytes:
                break
            evicted_places += regions.pop(region)["places"]
            evicted_regions += 1
        if total() <= self.budget_bytes:
            return evicted_regions, evicted_places
        # This commit's regions alone exceed the budget: their places go, least recently
        # observed first.
        mine = [r for r in written if r in regions]
        rows = [(int(s), r, i) for r in mine for i, s in enumerate(written[r].last_seen)]
        rows.sort()
        per_place = bytes_per_place(self.dim, self.k)
        excess = total() - self.budget_bytes
        drop: dict[Region, list[int]] = {}
        for _, region, index in rows:
            if excess <= 0:
                break
            drop.setdefault(region, []).append(index)
            excess -= per_place
        for region, indices in drop.items():
            segment = written[region]
            keep = np.ones(len(segment), bool)
            keep[indices] = False
            evicted_places += len(indices)
            if not keep.any():
                del regions[region]
                del written[region]
                evicted_regions += 1
                continue
            smaller = _Segment(segment.local[keep], segment.last_seen[keep], segment.seq[keep],
                               segment.codes[keep])
            written[region] = smaller
            regions[region] = self._entry(region, smaller, seq)
        return evicted_regions, evicted_places

    # -- what the store holds --------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        """Bytes on disk: segments and manifest."""
        size = sum(e["bytes"] for e in self.regions.values())
        with contextlib.suppress(OSError):
            size += self.manifest_path.stat().st_size
        return size

    @property
    def places(self) -> int:
        return sum(e["places"] for e in self.regions.values())

    def stats(self) -> dict[str, Any]:
        places = self.places
        return {"path": str(self.path), "places": places, "regions": len(self.regions),
                "bytes": self.nbytes, "budget_bytes": self.budget_bytes,
                "bytes_per_place": bytes_per_place(self.dim, self.k),
                "bytes_per_place_measured": self.nbytes / places if places else None,
                "commits": self.sequence, "grids": len(self.grids), "k": self.k,
                "dim": self.dim}

    def verify(self) -> int:
        """Read every segment the manifest names (a :class:`StorageError` names the first
        damaged one); returns the places held."""
        count = 0
        for region in self.regions:
            self._cache.pop(region, None)
            count += len(self._segment(region))
        return count
