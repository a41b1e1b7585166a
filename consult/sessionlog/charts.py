"""Server-drawn SVG charts: a line chart over time and a bar chart per day.

Hand-written SVG, no library and no script: the page's CSP forbids inline styles, so every
colour is a presentation attribute, and every label goes through ``escape``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape

from markupsafe import Markup

PALETTE = ("#1f6feb", "#d9480f", "#2f9e44", "#9c36b5", "#e67700", "#0c8599")
FONT = "system-ui, sans-serif"
AXIS = "#888888"
GRID = "#e5e5e5"


@dataclass(frozen=True)
class Series:
    label: str
    points: Sequence[tuple[float, float | None]]  # (x, y); y None is a gap
    color: str | None = None


def _e(value: object) -> str:
    return escape(str(value), quote=True)


@dataclass(frozen=True)
class Axis:
    """A value axis from 0 to ``top`` in ticks ``step`` apart; ``step`` is 1, 2 or 5 x 10^n."""

    top: float
    step: float

    @property
    def ticks(self) -> list[float]:
        count = round(self.top / self.step)
        return [self.step * i for i in range(count + 1)]

    def label(self, value: float) -> str:
        # As many decimals as the step has, no more: 0.2 0.4 0.6, never 0.2 0.5 0.8 for 0.25.
        if value == 0:
            return "0"
        decimals = max(0, -math.floor(math.log10(self.step) + 1e-9))
        return f"{value:.{decimals}f}"


def axis(value: float, *, integer: bool = False, intervals: int = 5) -> Axis:
    """The axis for data up to ``value``: a round step (1, 2 or 5 x 10^n) giving at most
    ``intervals`` intervals, and the first multiple of it at or above ``value``. ``integer``
    (counts) never steps by less than 1, so no tick reads 0.5 visits."""
    if value <= 0 or not math.isfinite(value):
        value = 1.0
    raw = value / intervals
    exp = math.floor(math.log10(raw))
    step = 10.0 ** (exp + 1)
    for m in (1, 2, 5):
        if m * 10.0**exp >= raw * 0.999999:
            step = m * 10.0**exp
            break
    if integer:
        step = max(1.0, float(round(step)))
    top = math.ceil(value / step - 1e-9) * step
    return Axis(top=float(top), step=float(step))


def nice_max(value: float) -> float:
    """The top of ``axis(value)``."""
    return axis(value).top


def _fmt(value: float) -> str:
    if value == int(value):
        return f"{int(value)}"
    return f"{value:.1f}" if abs(value) < 100 else f"{value:.0f}"


def _svg_open(width: int, height: int, title: str) -> list[str]:
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" width="{width}"'
        f' height="{height}" viewBox="0 0 {width} {height}" aria-label="{_e(title)}"'
        f' font-family="{FONT}" font-size="11">',
        f"<title>{_e(title)}</title>",
        f'<text x="4" y="13" font-size="12" font-weight="bold" fill="#333333">{_e(title)}</text>',
    ]


def _y_axis(out: list[str], left: int, top: int, right: int, bottom: int, y_axis: Axis, unit: str) -> None:
    for value in y_axis.ticks:
        y = bottom - (bottom - top) * value / y_axis.top
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}" stroke="{GRID}"/>')
        out.append(
            f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end" fill="{AXIS}">'
            f"{_e(y_axis.label(value))}</text>"
        )
    if unit:
        out.append(f'<text x="{left}" y="{top - 6}" fill="{AXIS}">{_e(unit)}</text>')
    out.append(f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="{AXIS}"/>')


def line_chart(
    series: Sequence[Series],
    *,
    title: str,
    unit: str = "",
    width: int = 560,
    height: int = 200,
    x_label: Callable[[float], str] = _fmt,
    y_max: float | None = None,
    empty_text: str = "No data",
    integer: bool = False,
) -> Markup:
    """Lines over a shared x axis (e.g. seconds since the call started)."""
    left, right, top, bottom = 44, width - 10, 32, height - 34
    out = _svg_open(width, height, title)
    xs = [x for s in series for x, y in s.points if y is not None]
    ys = [y for s in series for _x, y in s.points if y is not None]
    if not xs:
        out.append(
            f'<text x="{width / 2:.0f}" y="{height / 2:.0f}" text-anchor="middle" fill="{AXIS}">'
            f"{_e(empty_text)}</text></svg>"
        )
        return Markup("".join(out))  # noqa: S704 - every interpolated text went through _e
    x_min, x_max = min(xs), max(xs)
    if x_max == x_min:
        x_max = x_min + 1
    y_axis = axis(y_max if y_max is not None else max(ys), integer=integer)
    top_y = y_axis.top

    def px(x: float) -> float:
        return left + (right - left) * (x - x_min) / (x_max - x_min)

    def py(y: float) -> float:
        return bottom - (bottom - top) * min(max(y, 0.0), top_y) / top_y

    _y_axis(out, left, top, right, bottom, y_axis, unit)
    for i in range(5):
        x = x_min + (x_max - x_min) * i / 4
        out.append(
            f'<text x="{px(x):.1f}" y="{bottom + 14}" text-anchor="middle" fill="{AXIS}">'
            f"{_e(x_label(x))}</text>"
        )
    legend_x = left
    for n, s in enumerate(series):
        color = s.color or PALETTE[n % len(PALETTE)]
        segments: list[list[str]] = [[]]
        for x, y in s.points:
            if y is None:
                segments.append([])
            else:
                segments[-1].append(f"{px(x):.1f},{py(y):.1f}")
        for seg in segments:
            if len(seg) == 1:
                cx, cy = seg[0].split(",")
                out.append(f'<circle cx="{cx}" cy="{cy}" r="2" fill="{_e(color)}"/>')
            elif seg:
                out.append(
                    f'<polyline fill="none" stroke="{_e(color)}" stroke-width="1.5"'
                    f' stroke-linejoin="round" points="{" ".join(seg)}"/>'
                )
        out.append(
            f'<rect x="{legend_x}" y="{height - 12}" width="10" height="3" fill="{_e(color)}"/>'
            f'<text x="{legend_x + 14}" y="{height - 8}" fill="#333333">{_e(s.label)}</text>'
        )
        legend_x += 24 + 7 * len(s.label)
    out.append("</svg>")
    return Markup("".join(out))  # noqa: S704 - every interpolated text went through _e


def bar_chart(
    bars: Sequence[tuple[str, float | None]],
    *,
    title: str,
    unit: str = "",
    width: int = 560,
    height: int = 200,
    color: str = PALETTE[0],
    y_max: float | None = None,
    value_format: Callable[[float], str] = _fmt,
    label_every: int | None = None,
    integer: bool = False,
) -> Markup:
    """One bar per label (e.g. per day); None draws no bar (no data, not zero). ``integer``:
    the values are counts (whole-number ticks)."""
    left, right, top, bottom = 44, width - 10, 32, height - 24
    out = _svg_open(width, height, title)
    values = [v for _label, v in bars if v is not None]
    y_axis = axis(y_max if y_max is not None else (max(values) if values else 0), integer=integer)
    top_y = y_axis.top
    _y_axis(out, left, top, right, bottom, y_axis, unit)
    n = max(1, len(bars))
    slot = (right - left) / n
    every = label_every or max(1, math.ceil(n / 8))
    for i, (label, value) in enumerate(bars):
        x = left + slot * i
        if value is not None:
            h = (bottom - top) * min(max(value, 0.0), top_y) / top_y
            out.append(
                f'<rect x="{x + slot * 0.15:.1f}" y="{bottom - h:.1f}" width="{slot * 0.7:.1f}"'
                f' height="{h:.1f}" fill="{_e(color)}"><title>{_e(label)}: {_e(value_format(value))}'
                "</title></rect>"
            )
        if i % every == 0:
            out.append(
                f'<text x="{x + slot / 2:.1f}" y="{bottom + 14}" text-anchor="middle" fill="{AXIS}">'
                f"{_e(label)}</text>"
            )
    out.append("</svg>")
    return Markup("".join(out))  # noqa: S704 - every interpolated text went through _e
