"""Windows, tiling with overlap, and seamless stitching back to the full grid."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from onboard.runtime.errors import ConfigError, ShapeError


@dataclass(frozen=True)
class Window:
    """A rectangle of pixels: offsets and size on the full grid."""

    row_off: int
    col_off: int
    height: int
    width: int

    @property
    def slices(self) -> tuple[slice, slice]:
        return (
            slice(self.row_off, self.row_off + self.height),
            slice(self.col_off, self.col_off + self.width),
        )

    def relative_to(self, outer: Window) -> Window:
        """This window in the coordinates of ``outer``, which contains it."""
        return Window(self.row_off - outer.row_off, self.col_off - outer.col_off,
                      self.height, self.width)

    def scaled(self, factor: int) -> Window:
        return Window(self.row_off * factor, self.col_off * factor,
                      self.height * factor, self.width * factor)


@dataclass(frozen=True)
class TilePlacement:
    """Where a tile is read from, and the part of it (``core``) that it owns when stitching."""

    index: int
    window: Window
    core: Window


def _starts(length: int, tile: int, stride: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    # The last tile is moved inward so that every tile is whole and the edge is covered.
    starts.append(length - tile)
    return sorted(set(starts))


def _cores(starts: list[int], tile: int, length: int) -> list[tuple[int, int]]:
    """Split [0, length) among tiles at the middle of each overlap, so that seams fall where
    both neighbours have context on either side."""
    bounds = [0]
    for left, right in zip(starts, starts[1:], strict=False):
        bounds.append((right + min(left + tile, length)) // 2)
    bounds.append(length)
    return list(zip(bounds, bounds[1:], strict=False))


@dataclass(frozen=True)
class TileGrid:
    """Cuts a ``height`` × ``width`` grid into ``tile`` × ``tile`` windows overlapping by
    ``overlap`` pixels. Edge tiles are shifted inward, so all tiles are whole when the grid is at
    least one tile in size."""

    height: int
    width: int
    tile: int = 256
    overlap: int = 0

    def __post_init__(self) -> None:
        if self.tile <= 0:
            raise ConfigError(f"tile size must be positive, got {self.tile}")
        if not 0 <= self.overlap < self.tile:
            raise ConfigError(f"overlap must be in [0, tile), got {self.overlap}")
        if self.height <= 0 or self.width <= 0:
            raise ConfigError(f"grid must be non-empty, got {self.height}×{self.width}")

    def __iter__(self) -> Iterator[TilePlacement]:
        stride = self.tile - self.overlap
        rows = _starts(self.height, self.tile, stride)
        cols = _starts(self.width, self.tile, stride)
        th, tw = min(self.tile, self.height), min(self.tile, self.width)
        row_cores = _cores(rows, th, self.height)
        col_cores = _cores(cols, tw, self.width)
        index = 0
        for r, (r0, r1) in zip(rows, row_cores, strict=True):
            for c, (c0, c1) in zip(cols, col_cores, strict=True):
                yield TilePlacement(index, Window(r, c, th, tw), Window(r0, c0, r1 - r0, c1 - c0))
                index += 1

    def __len__(self) -> int:
        stride = self.tile - self.overlap
        return len(_starts(self.height, self.tile, stride)) * len(
            _starts(self.width, self.tile, stride)
        )


class Stitcher:
    """Puts tile results back on the full grid; each tile contributes only its core.

    ``scale`` is the output's sampling relative to the input grid (2 for ×2 super-resolution).
    """

    def __init__(self, grid: TileGrid, channels: int, dtype: np.dtype | type, scale: int = 1):
        self.grid = grid
        self.scale = scale
        self.out = np.zeros((channels, grid.height * scale, grid.width * scale), dtype=dtype)
        self._filled = 0

    def add(self, placement: TilePlacement, result: np.ndarray) -> None:
        expected = (placement.window.height * self.scale, placement.window.width * self.scale)
        if result.ndim == 2:
            result = result[None]
        if result.shape[1:] != expected:
            raise ShapeError(f"tile {placement.index} result is {result.shape[1:]}, "
                             f"expected {expected}")
        inner = placement.core.relative_to(placement.window).scaled(self.scale)
        self.out[(slice(None), *placement.core.scaled(self.scale).slices)] = result[
            (slice(None), *inner.slices)
        ]
        self._filled += placement.core.height * placement.core.width

    @property
    def complete(self) -> bool:
        return self._filled == self.grid.height * self.grid.width


class StreamingStitcher:
    """Stitches tile results like :class:`Stitcher`, but hands the output on in row-major
    ``block`` × ``block`` pieces, all channels, as soon as every tile under a row of pieces is
    in, so only about ``block + tile × scale`` output rows are ever held (a ×2 product of a
    10980² scene never sits in memory whole).

    Tiles must arrive in the grid's order (as :func:`~onboard.runtime.sources.base.iter_tiles`
    yields them); a tile that never arrives (unreadable, skipped) keeps ``fill``. Pieces come
    from :meth:`stream` or :meth:`ready`, each ``(block, block, channels)`` (``(block, block)``
    for one channel), padded with ``fill`` past the edge: the tile order and shape of a tiled,
    pixel-interleaved GeoTIFF.
    """

    def __init__(self, grid: TileGrid, channels: int, dtype: np.dtype | type, scale: int = 1,
                 block: int = 256, fill: float = 0) -> None:
        if block <= 0 or scale <= 0:
            raise ConfigError(f"block and scale must be positive, got {block} and {scale}")
        self.grid = grid
        self.channels = channels
        self.dtype = np.dtype(dtype)
        self.scale = scale
        self.block = block
        self.fill = fill
        self.height, self.width = grid.height * scale, grid.width * scale
        placements = list(grid)
        self._columns = len({p.window.col_off for p in placements})
        # Output row up to which the output is final once grid rows 0..i are all in.
        self._row_ends = [p.core.row_off * scale + p.core.height * scale
                          for p in placements[:: self._columns]]
        self._total = len(placements)
        self._next = 0  # the grid index expected next
        self._final_rows = 0
        self._emitted = 0  # output rows handed on so far (a multiple of block)
        self._top = 0  # the output row at buffer row 0
        self._buffer = self._blank(block + min(grid.tile, grid.height) * scale)

    def _blank(self, rows: int) -> np.ndarray:
        return np.full((rows, -(-self.width // self.block) * self.block, self.channels),
                       self.fill, self.dtype)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of the whole output."""
        return (self.channels, self.height, self.width)

    def add(self, placement: TilePlacement, result: np.ndarray) -> None:
        expected = (placement.window.height * self.scale, placement.window.width * self.scale)
        if result.ndim == 2:
            result = result[None]
        if result.shape[1:] != expected or result.shape[0] != self.channels:
            raise ShapeError(f"tile {placement.index} result is {result.shape}, expected "
                             f"{(self.channels, *expected)}")
        if placement.index < self._next:
            raise ShapeError(f"tile {placement.index} arrived after tile {self._next - 1}: "
                             "tiles must come in the grid's order")
        core = placement.core.scaled(self.scale)
        inner = placement.core.relative_to(placement.window).scaled(self.scale)
        top = core.row_off - self._top
        if top + core.height > len(self._buffer):
            grown = self._blank(top + core.height)
            grown[: len(self._buffer)] = self._buffer
            self._buffer = grown
        rows, cols = inner.slices
        self._buffer[top : top + core.height, core.col_off : core.col_off + core.width] = \
            np.moveaxis(result[:, rows, cols], 0, -1)
        self._advance(placement.index + 1)

    def _advance(self, next_index: int) -> None:
        self._next = next_index
        done_rows = next_index // self._columns
        if done_rows:
            self._final_rows = self._row_ends[done_rows - 1]

    def finish(self) -> None:
        """Every tile has been given (those missing stay ``fill``)."""
        self._advance(self._total)
        self._final_rows = self.height

    def ready(self) -> Iterator[np.ndarray]:
        """The pieces whose rows are final, in order; each is handed on once."""
        b = self.block
        while self._emitted < self.height and (
                self._emitted + b <= self._final_rows or self._final_rows >= self.height):
            start = self._emitted - self._top
            rows = self._buffer[start : start + b]
            if len(rows) < b:  # the last row of pieces, past the bottom edge
                rows = np.concatenate([rows, self._blank(b - len(rows))])
            for col in range(0, self._buffer.shape[1], b):
                piece = np.ascontiguousarray(rows[:, col : col + b])
                yield piece[..., 0] if self.channels == 1 else piece
            self._emitted += b
            self._drop_emitted()

    def _drop_emitted(self) -> None:
        # Shift in place: a fresh buffer per row of pieces would double the peak memory.
        start = self._emitted - self._top
        kept = len(self._buffer) - start
        self._buffer[:kept] = self._buffer[start:]
        self._buffer[kept:] = self.fill
        self._top = self._emitted

    def stream(self, results: Iterator[tuple[TilePlacement, np.ndarray]]
               ) -> Iterator[np.ndarray]:
        """Pieces of the output, pulling tile results from ``results`` only as needed."""
        for placement, result in results:
            self.add(placement, result)
            yield from self.ready()
        self.finish()
        yield from self.ready()


def tile_array(pixels: np.ndarray, grid: TileGrid) -> Iterator[tuple[TilePlacement, np.ndarray]]:
    """Tiles of an in-memory (bands, height, width) array."""
    for placement in grid:
        yield placement, pixels[(slice(None), *placement.window.slices)]


@dataclass(frozen=True)
class CoreGrid:
    """A regular grid of ``tile`` × ``tile`` cores (the units the planner ranks), each read
    with ``halo`` pixels of context on every side.

    Every window has the same size (``tile + 2 * halo``, or the whole grid where it is
    smaller), shifted inward at the edges, so that a batch of windows stacks without padding;
    cores are regular and do not overlap (the last row and column may be narrower).
    """

    height: int
    width: int
    tile: int = 256
    halo: int = 16

    def __post_init__(self) -> None:
        if self.tile <= 0:
            raise ConfigError(f"tile size must be positive, got {self.tile}")
        if not 0 <= self.halo <= self.tile:
            raise ConfigError(f"halo must be in [0, tile], got {self.halo}")
        if self.height <= 0 or self.width <= 0:
            raise ConfigError(f"grid must be non-empty, got {self.height}×{self.width}")

    @property
    def rows(self) -> int:
        return -(-self.height // self.tile)

    @property
    def cols(self) -> int:
        return -(-self.width // self.tile)

    def __len__(self) -> int:
        return self.rows * self.cols

    def window_shape(self) -> tuple[int, int]:
        size = self.tile + 2 * self.halo
        return (min(size, self.height), min(size, self.width))

    def __iter__(self) -> Iterator[TilePlacement]:
        wh, ww = self.window_shape()
        index = 0
        for r in range(self.rows):
            r0 = r * self.tile
            ch = min(self.tile, self.height - r0)
            wr = min(max(r0 - self.halo, 0), self.height - wh)
            for c in range(self.cols):
                c0 = c * self.tile
                cw = min(self.tile, self.width - c0)
                wc = min(max(c0 - self.halo, 0), self.width - ww)
                yield TilePlacement(index, Window(wr, wc, wh, ww), Window(r0, c0, ch, cw))
                index += 1
