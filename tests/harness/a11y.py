"""Legibility checks of a patient page in the browser, beside axe (tests/harness/axe.py):
touch targets of at least 44 x 44 CSS px, and text at 200 % without horizontal scrolling or
cut-off controls. Each returns what it found wrong as readable lines; `PageAudit` runs them
all (and axe, and a screenshot) on every page of a walk and reports at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from playwright.async_api import Page

from tests.harness.axe import axe_check, failing
from tests.harness.browser import save_screenshot

MIN_TARGET_PX = 44

# Every control a finger must hit: buttons, form controls, links that stand alone (a link inside
# a sentence is excepted, as WCAG 2.5.5 allows), anything styled as a button (a label around a
# hidden file input). A check box or radio button inside its label is measured as the label,
# which is what takes the tap.
SMALL_TARGETS_JS = """(min) => {
  const inSentence = (a) => Array.from(a.parentElement ? a.parentElement.childNodes : [])
    .some((n) => n.nodeType === Node.TEXT_NODE && /[^\\s·|()（）]/.test(n.textContent));
  const describe = (el, r) => {
    const text = (el.innerText || el.value || el.getAttribute("aria-label") || el.name || "").trim();
    const classes = typeof el.className === "string" ? el.className.trim().split(/\\s+/) : [];
    const cls = classes.filter(Boolean).map((c) => "." + c).join("");
    const size = `${Math.round(r.width)}x${Math.round(r.height)}`;
    return `${el.tagName.toLowerCase()}${cls} "${text.slice(0, 30)}" ${size}`;
  };
  const small = [];
  const selector = "button, .button, input:not([type=hidden]), select, textarea, a[href], [role=button],"
    + " summary";
  for (const el of document.querySelectorAll(selector)) {
    if (el.getClientRects().length === 0) continue;  // not rendered (hidden, or in a closed part)
    const style = getComputedStyle(el);
    if (style.visibility === "hidden") continue;
    if (el.matches("a") && !el.matches(".button, [role=button]") && inSentence(el)) continue;
    let target = el;
    if (el.matches("input[type=checkbox], input[type=radio], input[type=file]") && el.closest("label")) {
      target = el.closest("label");
    }
    const r = target.getBoundingClientRect();
    if (r.width < min - 0.5 || r.height < min - 0.5) small.push(describe(el, r));
  }
  return small;
}"""

# Text at 200 % (WCAG 1.4.4): the root font size doubled (from whatever it is: the large-text
# switch's too), as a reader's text-size setting does; set through the CSSOM, which the page's
# CSP allows (a <style> element it would refuse).
TEXT_200_JS = """() => {
  const root = document.documentElement;
  const size = parseFloat(getComputedStyle(root).fontSize);
  root.style.setProperty("font-size", `${2 * size}px`, "important");
  return new Promise((resolve) => requestAnimationFrame(() => requestAnimationFrame(resolve)));
}"""
TEXT_100_JS = """() => { document.documentElement.style.removeProperty("font-size"); }"""

# The phone's width is the viewport's, given by the test: innerWidth is no measure on a mobile
# viewport, where Chromium widens the layout viewport to fit content that is too wide.
OVERFLOW_JS = """(width) => {
  const problems = [];
  const body = parseFloat(getComputedStyle(document.querySelector("main") || document.body).fontSize);
  const scroll = document.scrollingElement.scrollWidth;
  if (scroll > width) {
    // Name the innermost elements that reach past the screen: where the fix goes.
    const wide = (el) => el.getBoundingClientRect().right > width + 1;
    const culprits = Array.from(document.body.querySelectorAll("*"))
      .filter((el) => wide(el) && !Array.from(el.children).some(wide))
      .slice(0, 5)
      .map((el) => el.tagName.toLowerCase() + (el.className ? "." + String(el.className).split(" ")[0] : ""));
    problems.push(`the page scrolls sideways: ${scroll} px wide in a ${width} px window`
                  + ` (${culprits.join(", ")})`);
  }
  const selector = "button, input:not([type=hidden]), select, textarea, a.button, [role=button], label";
  for (const el of document.querySelectorAll(selector)) {
    if (el.getClientRects().length === 0) continue;
    const r = el.getBoundingClientRect();
    const style = getComputedStyle(el);
    const text = (el.innerText || el.value || el.name || "").trim().slice(0, 30);
    const what = `${el.tagName.toLowerCase()} "${text}"`;
    if (r.right > width + 1 || r.left < -1) {
      problems.push(`${what} reaches past the screen (${Math.round(r.left)}..${Math.round(r.right)})`);
    } else if (style.overflowX !== "visible" && el.scrollWidth > el.clientWidth + 1
               && !el.matches("input, select, textarea")) {
      problems.push(`${what} cuts its text off (${el.scrollWidth} > ${el.clientWidth})`);
    }
  }
  // Text cut off by its box (an ellipsis, or overflow hidden): words the reader cannot see.
  const ownText = (el) => Array.from(el.childNodes)
    .some((n) => n.nodeType === Node.TEXT_NODE && n.textContent.trim());
  for (const el of document.body.querySelectorAll("*")) {
    if (el.matches("input, select, textarea") || el.getClientRects().length === 0 || !ownText(el)) continue;
    const style = getComputedStyle(el);
    if (!["hidden", "clip"].includes(style.overflowX) && style.textOverflow !== "ellipsis") continue;
    if (el.scrollWidth > el.clientWidth + 1) {
      problems.push(`${el.tagName.toLowerCase()} "${el.textContent.trim().slice(0, 30)}" is cut off`);
    }
  }
  return { problems, fontSize: body };
}"""


async def small_targets(page: Page) -> list[str]:
    return await page.evaluate(SMALL_TARGETS_JS, MIN_TARGET_PX)


async def text_200_problems(page: Page, screenshot: str | None = None) -> list[str]:
    """Doubles the text size, lists what breaks (and saves a screenshot of it under that name),
    and puts the size back."""
    width = page.viewport_size["width"]
    normal = await page.evaluate(OVERFLOW_JS, width)
    await page.evaluate(TEXT_200_JS)
    try:
        doubled = await page.evaluate(OVERFLOW_JS, width)
        if screenshot:
            await save_screenshot(page, screenshot)
    finally:
        await page.evaluate(TEXT_100_JS)
    problems = [f"already at 100 %: {p}" for p in normal["problems"]]
    problems += doubled["problems"]
    if doubled["fontSize"] < 1.9 * normal["fontSize"]:
        problems.append(f"the text did not grow: {normal['fontSize']} px -> {doubled['fontSize']} px")
    return problems


@dataclass
class PageAudit:
    """Checks every page of a walk; `assert_clean()` at the end lists everything found."""

    prefix: str = ""
    seen: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    async def check(self, page: Page, name: str) -> None:
        name = self.prefix + name
        await page.wait_for_load_state("load")
        self.seen.append(name)
        result = await axe_check(page, name, fail=False)
        for violation in failing(result):
            targets = "; ".join(" ".join(node["target"]) for node in violation["nodes"])
            self.problems.append(f"{name}: axe {violation['impact']} {violation['id']} at {targets}")
        self.problems += [f"{name}: touch target under 44 px: {t}" for t in await small_targets(page)]
        await save_screenshot(page, name)
        doubled = await text_200_problems(page, f"{name}-text200")
        self.problems += [f"{name}: at 200 % text: {p}" for p in doubled]

    def assert_clean(self) -> None:
        assert not self.problems, f"{len(self.problems)} problems on the patient pages:\n" + "\n".join(
            self.problems
        )
