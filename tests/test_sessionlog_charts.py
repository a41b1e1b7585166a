"""Server-drawn SVG charts: well-formed XML, escaped labels, honest gaps."""

from __future__ import annotations

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


@pytest.mark.parametrize(("value", "top"), [(0, 1), (0.3, 0.5), (7, 10), (12, 20), (240, 250), (1001, 2000)])
def test_nice_axis_tops(value, top):
    assert charts.nice_max(value) == top
