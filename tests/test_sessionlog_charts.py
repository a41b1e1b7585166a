"""Server-drawn SVG charts: well-formed XML, escaped labels, honest gaps."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import pytest

from consult.sessionlog import charts

SVG = "{http://www.w3.org/2000/svg}"
HOSTILE = "<script>alert(\"x\")</script> & 'quote'"


def parse(svg: str) -> ET.Element:
    root = ET.fromstring(str(svg))  # noqa: S314 - our own output
    assert root.tag == f"{SVG}svg"
    return root


def texts(root: ET.Element) -> list[str]:
    return [t.text or "" for t in root.iter(f"{SVG}text")]


def test_line_chart_is_valid_svg_with_escaped_labels():
    svg = charts.line_chart(
        [
            charts.Series(HOSTILE, [(0, 10), (5, 20), (10, None), (15, 30), (20, 25)]),
            charts.Series("Doctor", [(0, 1000), (20, 1200)]),
        ],
        title=HOSTILE,
        unit="kbit/s",
    )
    assert "<script>" not in svg
    root = parse(svg)
    assert root.find(f"{SVG}title").text == HOSTILE
    assert HOSTILE in texts(root)
    # The gap at t=10 splits the first series: two runs, plus the second series.
    assert len(list(root.iter(f"{SVG}polyline"))) == 3
    for line in root.iter(f"{SVG}polyline"):
        for point in line.get("points").split():
            x, y = (float(v) for v in point.split(","))
            assert 0 <= x <= 560 and 0 <= y <= 200


def test_line_chart_without_data_says_so():
    root = parse(charts.line_chart([], title="Bitrate", empty_text="No samples"))
    assert "No samples" in texts(root)


@pytest.mark.parametrize("values", [[3, 0, None, 7.5], [None, None], [0, 0], []])
def test_bar_chart_is_valid_svg(values):
    bars = [(f"01-{i:02d}", v) for i, v in enumerate(values)]
    root = parse(charts.bar_chart(bars, title="Visits <per> day", unit="%"))
    drawn = [r for r in root.iter(f"{SVG}rect")]
    assert len(drawn) == sum(v is not None for v in values)
    assert root.get("aria-label") == "Visits <per> day"
    for r in drawn:
        assert float(r.get("height")) >= 0


def test_bar_heights_are_proportional_and_capped():
    root = parse(charts.bar_chart([("a", 50), ("b", 100), ("c", 250)], title="t", y_max=100))
    heights = [float(r.get("height")) for r in root.iter(f"{SVG}rect")]
    assert heights[1] == pytest.approx(2 * heights[0])
    assert heights[2] == heights[1]  # beyond the axis: drawn to the top, not off the chart


@pytest.mark.parametrize(("value", "top"), [(0, 1), (0.3, 0.3), (7, 8), (12, 15), (240, 250), (1001, 1500)])
def test_nice_axis_tops(value, top):
    assert charts.nice_max(value) == pytest.approx(top)


def _round_step(step: float) -> bool:
    mantissa = step / 10 ** math.floor(math.log10(step) + 1e-9)
    return any(abs(mantissa - m) < 1e-9 for m in (1, 2, 5))


@pytest.mark.parametrize("value", [0.01, 0.3, 0.75, 1, 2.5, 3, 7, 12, 37, 99.5, 100, 240, 1001, 123456])
@pytest.mark.parametrize("integer", [False, True])
def test_axis_steps_are_round(value, integer):
    found = charts.axis(value, integer=integer)
    assert _round_step(found.step), found
    assert found.top >= value and found.top - found.step < value
    assert 1 <= len(found.ticks) - 1 <= 5
    if integer:
        assert found.step >= 1 and all(t == int(t) for t in found.ticks)


def y_labels(root: ET.Element) -> list[str]:
    return [t.text or "" for t in root.iter(f"{SVG}text") if t.get("text-anchor") == "end"]


def test_counts_have_whole_ticks():
    # A quiet week: one, two or no visits a day. The axis reads 0 1 2, never 0.5 or 0.8.
    bars = [("11-01", 1), ("11-02", 0), ("11-03", 2), ("11-04", None)]
    labels = y_labels(parse(charts.bar_chart(bars, title="Visits per day", integer=True)))
    assert labels == ["0", "1", "2"]


def test_fraction_ticks_are_round_and_printed_exactly():
    labels = y_labels(parse(charts.bar_chart([("a", 0.9)], title="t")))
    assert labels == ["0", "0.2", "0.4", "0.6", "0.8", "1.0"]
    labels = y_labels(parse(charts.bar_chart([("a", 30)], title="t", y_max=100)))
    assert labels == ["0", "20", "40", "60", "80", "100"]
    labels = y_labels(parse(charts.line_chart([charts.Series("x", [(0, 1.0), (1, 2.2)])], title="t")))
    assert labels == ["0", "0.5", "1.0", "1.5", "2.0", "2.5"]
