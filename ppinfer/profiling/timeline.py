"""The pipeline timeline picture: one row per stage, one bar per compute span, coloured by
lane (prefill a darker shade of the lane's colour than decode), against seconds since the
loop started; rasterised with numpy alone and written as PNG with zlib + struct, so no
plotting or imaging library is needed.

Spans travel as a "span table": a float64 array `[n, 4]` with the columns `SPAN_COLUMNS`
(start and end in seconds since the stage's loop started, lane, kind), one table per stage.
Empty time in a stage's row is its bubble: waiting for a neighbour, communicating, sampling.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPAN_COLUMNS = ("start_s", "end_s", "lane", "kind")
PREFILL_KIND = 1
"""The `kind` value of a prefill span (`ppinfer.pipeline.scheduler.Kind.PREFILL`; a test keeps
the two equal without this module importing the pipeline)."""

Colour = tuple[int, int, int]

LANE_COLOURS: tuple[Colour, ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (188, 189, 34), (23, 190, 207), (127, 127, 127),
)
"""Lane `l` is drawn in `LANE_COLOURS[l % len(LANE_COLOURS)]`."""
PREFILL_SHADE = 0.6
"""Prefill bars use the lane colour scaled by this, so prompt work stands out from decode."""
BACKGROUND: Colour = (255, 255, 255)
ROW_BACKGROUND: Colour = (238, 238, 238)
GRID: Colour = (212, 212, 212)
INK: Colour = (40, 40, 40)

# 3x5 bitmaps (rows top to bottom), enough for stage numbers and tick labels with a unit.
_GLYPHS: dict[str, tuple[str, ...]] = {
    "0": ("###", "#.#", "#.#", "#.#", "###"),
    "1": (".#.", "##.", ".#.", ".#.", "###"),
    "2": ("###", "..#", "###", "#..", "###"),
    "3": ("###", "..#", "###", "..#", "###"),
    "4": ("#.#", "#.#", "###", "..#", "..#"),
    "5": ("###", "#..", "###", "..#", "###"),
    "6": ("###", "#..", "###", "#.#", "###"),
    "7": ("###", "..#", "..#", "..#", "..#"),
    "8": ("###", "#.#", "###", "#.#", "###"),
    "9": ("###", "#.#", "###", "..#", "###"),
    ".": ("...", "...", "...", "...", ".#."),
    "m": ("...", "...", "###", "###", "#.#"),
    "s": ("...", ".##", "##.", "..#", "##."),
}
_FONT_SCALE = 2
_GLYPH_W, _GLYPH_H = 3 * _FONT_SCALE, 5 * _FONT_SCALE
_GLYPH_ADVANCE = _GLYPH_W + _FONT_SCALE


def span_colour(lane: int, kind: int) -> Colour:
    """The fill of a span of `lane` and `kind`."""
    base = LANE_COLOURS[lane % len(LANE_COLOURS)]
    if kind == PREFILL_KIND:
        r, g, b = (int(c * PREFILL_SHADE) for c in base)
        return (r, g, b)
    return base


@dataclass(frozen=True)
class TimelineLayout:
    """Where things go on the picture: stage rows top to bottom, time left to right."""

    n_stages: int
    t_end: float
    """Seconds at the right edge of the plot (the latest span end)."""
    width: int = 1200
    left: int = 40
    right: int = 16
    top: int = 10
    row_height: int = 32
    row_gap: int = 8
    bottom: int = 36

    @property
    def plot_width(self) -> int:
        return self.width - self.left - self.right

    @property
    def axis_y(self) -> int:
        """The row of pixels of the time axis, just below the last stage."""
        return self.top + self.n_stages * (self.row_height + self.row_gap)

    @property
    def height(self) -> int:
        return self.axis_y + self.bottom

    def x(self, t: float) -> int:
        """Pixel column of time `t` seconds."""
        frac = t / self.t_end if self.t_end > 0 else 0.0
        return self.left + round(min(max(frac, 0.0), 1.0) * self.plot_width)

    def row(self, stage: int) -> tuple[int, int]:
        """Pixel rows [y0, y1) of `stage`'s bars."""
        y0 = self.top + stage * (self.row_height + self.row_gap)
        return y0, y0 + self.row_height


def _fill(img: np.ndarray, y0: int, y1: int, x0: int, x1: int, colour: Colour) -> None:
    img[y0:y1, x0:x1] = colour  # img [H, W, 3]


def _draw_text(img: np.ndarray, text: str, x_centre: int, y_top: int) -> None:
    x = x_centre - (len(text) * _GLYPH_ADVANCE - _FONT_SCALE) // 2
    for char in text:
        for gy, line in enumerate(_GLYPHS[char]):
            for gx, bit in enumerate(line):
                if bit == "#":
                    px, py = x + gx * _FONT_SCALE, y_top + gy * _FONT_SCALE
                    _fill(img, py, py + _FONT_SCALE, max(px, 0), max(px + _FONT_SCALE, 0), INK)
        x += _GLYPH_ADVANCE


def _ticks(t_end: float, per_unit: float, target: int = 8) -> tuple[list[float], int]:
    """Tick values (in the display unit) at a 1/2/5 x 10^k step, and their decimals."""
    span = t_end * per_unit
    raw = span / target if span > 0 else 1.0
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1.0, 2.0, 5.0, 10.0) if m * magnitude >= raw)
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    count = int(span / step + 1e-9)
    return [i * step for i in range(count + 1)], decimals


def render_timeline(tables: Sequence[np.ndarray], width: int = 1200) -> np.ndarray:
    """Draw stage `s`'s span table `tables[s]` ([n, 4], see `SPAN_COLUMNS`) in row `s`.

    Returns an RGB image `[H, W, 3]` uint8. Every span is at least one pixel wide, so short
    decode steps stay visible next to long prefill chunks.
    """
    if not tables:
        raise ValueError("render_timeline needs at least one stage's span table")
    for s, table in enumerate(tables):
        if table.ndim != 2 or table.shape[1] != len(SPAN_COLUMNS):
            raise ValueError(f"stage {s}: span table must be [n, {len(SPAN_COLUMNS)}], got {list(table.shape)}")
    t_end = max((float(t[:, 1].max()) for t in tables if len(t)), default=0.0)
    layout = TimelineLayout(len(tables), t_end, width)
    img = np.empty((layout.height, layout.width, 3), dtype=np.uint8)  # [H, W, 3]
    img[:] = BACKGROUND
    plot_x0, plot_x1 = layout.left, layout.left + layout.plot_width
    for s in range(len(tables)):
        y0, y1 = layout.row(s)
        _fill(img, y0, y1, plot_x0, plot_x1, ROW_BACKGROUND)
        _draw_text(img, str(s), layout.left // 2, (y0 + y1 - _GLYPH_H) // 2)

    # Seconds up to 10 s read best in milliseconds.
    unit, per_unit = ("ms", 1e3) if t_end < 10.0 else ("s", 1.0)
    values, decimals = _ticks(t_end, per_unit)
    for value in values:
        x = layout.x(value / per_unit)
        _fill(img, layout.top, layout.axis_y, x, x + 1, GRID)
        _fill(img, layout.axis_y, layout.axis_y + 5, x, x + 1, INK)
        _draw_text(img, f"{value:.{decimals}f}", x, layout.axis_y + 8)
    _fill(img, layout.axis_y, layout.axis_y + 1, plot_x0, plot_x1 + 1, INK)
    _draw_text(img, unit, plot_x1 - _GLYPH_ADVANCE, layout.axis_y + 8 + _GLYPH_H + 4)

    for s, table in enumerate(tables):
        y0, y1 = layout.row(s)
        for start, end, lane, kind in table.tolist():
            x0 = layout.x(start)
            x1 = max(layout.x(end), x0 + 1)
            # A one-pixel gap keeps back-to-back spans of one lane apart where there is room.
            if x1 - x0 >= 4:
                x1 -= 1
            _fill(img, y0, y1, x0, x1, span_colour(int(lane), int(kind)))
    return img


def _chunk(tag: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(tag + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)


def encode_png(rgb: np.ndarray) -> bytes:
    """PNG bytes of an RGB image `[H, W, 3]` uint8 (8-bit truecolour, no filtering)."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"encode_png needs a [H, W, 3] uint8 array, got {list(rgb.shape)} {rgb.dtype}")
    height, width, _ = rgb.shape
    if height == 0 or width == 0:
        raise ValueError(f"encode_png needs a non-empty image, got {height}x{width}")
    rows = np.zeros((height, 1 + width * 3), dtype=np.uint8)  # filter byte 0 ("none"), then pixels
    rows[:, 1:] = rgb.reshape(height, width * 3)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, truecolour
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
        + _chunk(b"IEND", b"")
    )


def write_png(path: Path, rgb: np.ndarray) -> None:
    """Write `rgb` `[H, W, 3]` uint8 to `path` as PNG."""
    path.write_bytes(encode_png(rgb))
