"""The web page in a real headless browser: Debian's Chromium driven by Playwright (no browser download),
against `fedxray serve` running in a subprocess on a free local port."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.image_files import png
from inference_api.local_server import serving
from tests.inference_support import FINDINGS, trained_bundle, xray

expect = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed: it comes with the dev "
                             "extra (pip install -e '.[dev]'); the browser tests need it").expect
from tests.test_api import dcm, image16

CHROMIUM = os.environ.get("FEDXRAY_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`fedxray serve` in a subprocess; yields its base URL and always stops it."""
    bundle = trained_bundle(tmp_path_factory)
    env = {"FEDXRAY_OVERLAY_MAX_SIDE": "256", "FEDXRAY_MIN_RESOLUTION": "32"}
    with serving(bundle, tmp_path_factory.mktemp("server"), env) as (url, _):
        yield url


@pytest.fixture(scope="module")
def page(server):
    if not Path(CHROMIUM).is_file() and not shutil.which("chromium"):
        pytest.skip(f"no Chromium binary at {CHROMIUM} (install Debian's `chromium`: scripts/ensure-browser.sh)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM if Path(CHROMIUM).is_file() else shutil.which("chromium"),
                                     args=CHROMIUM_ARGS, headless=True)
        try:
            pg = browser.new_page(viewport={"width": 1200, "height": 800})
            yield pg
        finally:
            browser.close()


def _screenshot(pg, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    pg.screenshot(path=str(path), full_page=True)
    keep = os.environ.get("FEDXRAY_SCREENSHOT_DIR")  # set it to look at the page after the run
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / name)
    return path


def test_upload_shows_findings_and_toggles_heatmaps(page, server, tmp_path):
    page.goto(server + "/")
    expect(page.locator("#model-info")).to_have_text(re.compile("^Model fx-"))
    img = tmp_path / "chest.png"
    img.write_bytes(png(xray(256, seed=11, findings=("Nodule", "Cardiomegaly"))))
    page.set_input_files("#file", str(img))
    page.wait_for_selector("#findings tbody tr >> nth=3", timeout=20000)
    rows = page.locator("#findings tbody tr")
    assert rows.count() == len(FINDINGS)
    names = [rows.nth(i).get_attribute("data-finding") for i in range(rows.count())]
    assert sorted(names) == sorted(FINDINGS)
    probs = [float(rows.nth(i).locator("td").nth(1).inner_text().rstrip("%")) for i in range(rows.count())]
    assert probs == sorted(probs, reverse=True)
    assert page.locator("#view").get_attribute("src").startswith("data:image/png;base64,")
    assert page.locator("#view").evaluate("el => el.naturalWidth") == 256

    pressed = {n: page.locator(f"button.toggle[data-finding='{n}']").get_attribute("aria-pressed") for n in names}
    shown = [n for n, p in pressed.items() if p == "true"]
    assert len(shown) <= 1  # the top positive finding's heatmap (if any) is shown first
    target, second = [n for n in names if n not in shown][:2]
    button = page.locator(f"button.toggle[data-finding='{target}']")
    button.click()
    assert button.get_attribute("aria-pressed") == "true"
    assert page.locator("#caption").inner_text().startswith(f"Heatmap: {target}")
    heat_src = page.locator("#view").get_attribute("src")
    other = page.locator(f"button.toggle[data-finding='{second}']")
    other.click()
    assert button.get_attribute("aria-pressed") == "false" and other.get_attribute("aria-pressed") == "true"
    assert page.locator("#view").get_attribute("src") != heat_src
    _screenshot(page, tmp_path, "browser_heatmap.png")
    other.click()  # toggling the shown finding off returns to the plain image
    assert page.locator("#caption").inner_text().startswith("Original image")
    assert page.locator("#status").inner_text() == "Done: chest.png"


def test_dicom_upload_and_rejection_message(page, server, tmp_path):
    page.goto(server + "/")
    lateral = tmp_path / "lateral.dcm"
    lateral.write_bytes(dcm(image16(), ViewPosition="LL"))
    page.set_input_files("#file", str(lateral))
    expect(page.locator("#status")).to_have_text("Done: lateral.dcm", timeout=20000)
    assert "lateral view" in page.locator("#warnings").inner_text()
    assert page.locator("#warnings").is_visible()  # the warning box sits right above the findings it qualifies
    box, table = page.locator("#warnings").bounding_box(), page.locator("#findings").bounding_box()
    assert box["y"] + box["height"] <= table["y"] + 1 and abs(box["x"] - table["x"]) < 2
    assert page.locator("#caption").inner_text().startswith(("Heatmap", "Original image · 96×96 dicom"))

    bad = tmp_path / "notes.png"
    bad.write_bytes(b"this is not an image")
    page.set_input_files("#file", str(bad))
    expect(page.locator("#status")).to_have_text(re.compile("^Rejected"), timeout=20000)
    assert "Rejected (422)" in page.locator("#status").inner_text()
    assert "not a PNG, JPEG or DICOM" in page.locator("#status").inner_text()
    assert page.locator("#result").is_hidden()  # no stale findings from the previous image
    _screenshot(page, tmp_path, "browser_rejected.png")

    colour = tmp_path / "photo.png"
    rgb = np.zeros((96, 96, 3), np.uint8)
    rgb[..., 0], rgb[..., 2] = np.linspace(0, 255, 96)[None], np.linspace(255, 0, 96)[:, None]
    Image.fromarray(rgb).save(colour)
    page.set_input_files("#file", str(colour))
    expect(page.locator("#status")).to_have_text(re.compile("^Rejected"), timeout=20000)
    status = page.locator("#status").inner_text()
    assert status.startswith("Rejected (422): Not an X-ray: this is a colour image. refused: the image is in colour")
    assert "object Object" not in status and "not_grayscale" not in status


def test_page_runs_under_its_content_security_policy(server, tmp_path, page):
    violations = []
    page.on("console", lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None)
    page.goto(server + "/")
    expect(page.locator("#model-info")).to_have_text(re.compile("^Model fx-"))
    img = tmp_path / "chest.png"
    img.write_bytes(png(xray(128, seed=2)))
    page.set_input_files("#file", str(img))
    page.wait_for_selector("#findings tbody tr >> nth=3", timeout=20000)
    width = page.locator("#findings tbody tr .bar i").first.evaluate("el => el.style.width")
    assert width.endswith("%") and float(width[:-1]) > 0  # the probability bars, drawn without inline styles
    assert violations == []
