"""axe-core in the browser tests: `await axe_check(page, name)` checks the open page against the
WCAG 2 A and AA rules, prints what it found, writes `test-artifacts/axe/{name}.json`, and fails
on any serious or critical violation.

The app never serves axe: the npm package (pinned in programs.NPM_PACKAGES, installed under
.cache/npm by scripts/install-test-deps.sh) is read here and evaluated in the page through the
DevTools protocol (`Runtime.evaluate`), which the page's Content-Security-Policy does not govern.
So the page keeps its strict CSP (no `bypass_csp`), and axe sees the page as users get it.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from playwright.async_api import Page

from tests.harness.browser import artifacts_path
from tests.harness.programs import require_npm_package

# What axe runs: the WCAG 2.0 and 2.1 success criteria of levels A and AA.
WCAG_TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]
FAILING_IMPACTS = ("serious", "critical")
IMPACTS = ("critical", "serious", "moderate", "minor")

RUN_AXE = """async (tags) => {
  const results = await window.axe.run(document, {
    runOnly: { type: "tag", values: tags },
    resultTypes: ["violations", "incomplete"],
  });
  const slim = (items) => items.map((v) => ({
    id: v.id, impact: v.impact, help: v.help, helpUrl: v.helpUrl,
    nodes: v.nodes.map((n) => ({
      target: n.target, html: n.html, impact: n.impact, summary: n.failureSummary,
    })),
  }));
  return {
    url: location.href, axe: window.axe.version, tags,
    violations: slim(results.violations), incomplete: slim(results.incomplete),
    passes: results.passes.length,
  };
}"""


@functools.cache
def axe_source() -> str:
    return (require_npm_package("axe-core") / "axe.min.js").read_text()


async def inject_axe(page: Page) -> None:
    """Defines `window.axe` in the page (once per document), past the page's CSP."""
    if await page.evaluate("() => typeof window.axe === 'object'"):
        return
    cdp = await page.context.new_cdp_session(page)
    try:
        answer = await cdp.send("Runtime.evaluate", {"expression": axe_source(), "returnByValue": True})
    finally:
        await cdp.detach()
    if "exceptionDetails" in answer:
        raise AssertionError(f"axe-core did not load: {answer['exceptionDetails']}")


def summary(name: str, result: dict) -> str:
    """What the test output shows for one page: counts per impact, then each violation."""
    counts = dict.fromkeys(IMPACTS, 0)
    for violation in result["violations"]:
        counts[violation["impact"] or "minor"] += 1
    head = ", ".join(f"{n} {impact}" for impact, n in counts.items())
    lines = [f"axe {name} ({result['url']}): {head}; {result['passes']} rules passed"]
    for violation in result["violations"]:
        targets = "; ".join(" ".join(node["target"]) for node in violation["nodes"])
        lines.append(f"  {violation['impact']}: {violation['id']} ({violation['help']}) at {targets}")
    return "\n".join(lines)


def failing(result: dict) -> list[dict]:
    return [v for v in result["violations"] if v["impact"] in FAILING_IMPACTS]


async def axe_check(page: Page, name: str, *, fail: bool = True) -> dict:
    """Runs axe on the page; prints and saves the result; fails on serious/critical violations
    (with `fail=False` the caller collects them: `failing(result)`)."""
    await inject_axe(page)
    result = await page.evaluate(RUN_AXE, WCAG_TAGS)
    result["name"] = name
    path = axe_json_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, ensure_ascii=False, indent=1))
    text = summary(name, result)
    print(text)
    if fail and failing(result):
        raise AssertionError(f"serious or critical accessibility violations ({path}):\n{text}")
    return result


def axe_json_path(name: str) -> Path:
    return artifacts_path() / "axe" / f"{name}.json"
