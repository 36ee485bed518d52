"""The web page of src.serve in a real headless browser (Debian's chromium and chromium-driver, installed by
setup.sh): predictions agree with the API, the layout at a desktop's 1200x900 and a phone's 390x844, and a
screenshot of each, written under pytest's temporary folder (never into the checkout)."""

import asyncio
import base64
import colorsys
import os
import re
import shutil
from pathlib import Path

import aiohttp
import pytest
from PIL import Image

from src.data.images import VIEWS

REPO = Path(__file__).resolve().parent.parent
DESKTOP, PHONE = (1200, 900), (390, 844)


@pytest.fixture(scope="module")
def server(tiny_server):
    """The session's server (conftest.tiny_server): both tiny checkpoints, classification first (the default
    model)."""
    return tiny_server


def api(url: str, path: str, folder: Path | None = None, files: dict | None = None, params: dict | None = None):
    """GET `path`, or POST the four views of `folder` (or `files` {view: bytes}) to it; the JSON answer."""
    async def call():
        async with aiohttp.ClientSession() as session:
            if folder is None and files is None:
                async with session.get(url + path) as response:
                    return await response.json()
            form = aiohttp.FormData()
            views = files or {str(v): (folder / f"{v}.jpg").read_bytes() for v in VIEWS}
            for name, data in views.items():
                form.add_field(name, data, filename=f"{name}.jpg", content_type="image/jpeg")
            async with session.post(url + path, data=form, params=params) as response:
                return await response.json()
    return asyncio.run(call())


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium through chromedriver. Missing, it fails (never skips): setup.sh installs both. Its
    temporary files (profile, singleton socket) go under pytest's temporary folder."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and chromedriver, "install Debian's chromium and chromium-driver: run ./setup.sh"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(argument)
    scratch = tmp_path_factory.mktemp("chromium")
    driver = webdriver.Chrome(service=Service(chromedriver, env={**os.environ, "TMPDIR": str(scratch)}),
                              options=options)
    yield driver
    driver.quit()


def open_page(driver, url: str, size: tuple[int, int]):
    """The page at a viewport of exactly `size` (CSS pixels, as a device of that size shows it), ready."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    width, height = size
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {"width": width, "height": height,
                                                                  "deviceScaleFactor": 1, "mobile": width < 600})
    driver.get(url + "/")
    WebDriverWait(driver, 30).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "yes")
    return driver


def wait_for(driver, condition):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, 30).until(condition)


def rect(driver, selector: str) -> dict:
    return driver.execute_script("return document.querySelector(arguments[0]).getBoundingClientRect().toJSON()",
                                 selector)


def click_example(driver) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "example").click()
    wait_for(driver, lambda d: "km off" in d.find_element(By.ID, "details").text)


def test_uploaded_photos_and_the_example_give_the_apis_answer(server, browser, demo_dir):
    from selenium.webdriver.common.by import By

    driver = open_page(browser, server.url, DESKTOP)
    assert driver.find_element(By.CSS_SELECTOR, "#land path").get_attribute("d").startswith("M")
    assert len(driver.find_elements(By.CSS_SELECTOR, "#model option")) == 2
    folder = sorted((demo_dir / "data").iterdir())[5]
    for view in VIEWS:
        driver.find_element(By.ID, f"file-{view}").send_keys(str(folder / f"{view}.jpg"))
    driver.find_element(By.ID, "predict").click()
    coords = driver.find_element(By.ID, "coords")
    wait_for(driver, lambda d: coords.get_attribute("data-lat"))
    answer = api(server.url, "/api/predict", folder)
    page = float(coords.get_attribute("data-lat")), float(coords.get_attribute("data-lng"))
    assert page == pytest.approx((answer["latitude"], answer["longitude"]), abs=1e-9)
    assert len(driver.find_elements(By.CSS_SELECTOR, "#cells rect")) == 5
    assert driver.find_element(By.ID, "predicted-point") and "° N" in coords.text

    click_example(driver)
    example = api(server.url, "/api/examples")["examples"][0]
    files = {v: base64.b64decode(example["views"][v].split(",", 1)[1]) for v in example["views"]}
    answer = api(server.url, "/api/predict", files=files)
    assert float(coords.get_attribute("data-lat")) == pytest.approx(answer["latitude"], abs=1e-9)
    assert float(coords.get_attribute("data-lng")) == pytest.approx(answer["longitude"], abs=1e-9)
    assert driver.find_elements(By.CSS_SELECTOR, "#points circle.truth")
    assert driver.find_element(By.ID, "error").text == ""


def km_text(km: float) -> str:
    """A radius as the page writes it: whole km, one decimal below 10 km."""
    return f"{km:.1f}" if km < 10 else f"{round(km)}"


def test_the_confidence_regions_are_drawn_around_the_point_and_said_in_words(server, browser, demo_dir):
    from selenium.webdriver.common.by import By

    driver = open_page(browser, server.url, DESKTOP)
    folder = sorted((demo_dir / "data").iterdir())[7]
    for view in VIEWS:
        driver.find_element(By.ID, f"file-{view}").send_keys(str(folder / f"{view}.jpg"))
    driver.find_element(By.ID, "predict").click()
    wait_for(driver, lambda d: d.find_element(By.ID, "coords").get_attribute("data-lat"))
    answer = api(server.url, "/api/predict", folder)
    assert answer["calibrated"] and 0 < answer["radius50_km"] <= answer["radius90_km"]
    sentence = driver.find_element(By.ID, "confidence").text
    assert sentence == (f"90% sure it is within {km_text(answer['radius90_km'])} km, "
                        f"50% within {km_text(answer['radius50_km'])} km")
    point = driver.find_element(By.ID, "predicted-point")
    # the map: 140 px per degree of latitude, a degree being 6371.0088 km * pi / 180
    px_per_km = 140 / (6371.0088 * 3.141592653589793 / 180)
    for level in (90, 50):
        circle = driver.find_element(By.ID, f"region-{level}")
        assert circle.tag_name == "circle" and circle.is_displayed()
        assert float(circle.get_attribute("r")) == pytest.approx(answer[f"radius{level}_km"] * px_per_km, rel=1e-3)
        assert (float(circle.get_attribute("cx")), float(circle.get_attribute("cy"))) == pytest.approx(
            (float(point.get_attribute("cx")), float(point.get_attribute("cy"))))
    # drawn under the point, which stays visible on top
    order = driver.execute_script("return [...document.querySelectorAll('#map circle')].map((c) => c.id)")
    assert order.index("region-90") < order.index("predicted-point")


def luminance(colour: str) -> float:
    """Lightness of an SVG fill '#rrggbb'."""
    return colorsys.rgb_to_hls(*(int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5)))[1]


def test_desktop_layout_model_name_map_scale_and_cells_beside_the_map(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    driver = open_page(browser, server.url, DESKTOP)
    # the model drop-down shows its whole text: the run name (the details beside it)
    text_width, box_width = driver.execute_script("""
        const select = document.getElementById("model"), context = document.createElement("canvas").getContext("2d");
        context.font = getComputedStyle(select).font;
        return [context.measureText(select.selectedOptions[0].text).width, select.clientWidth];""")
    assert text_width + 20 <= box_width, (text_width, box_width)  # 20: the arrow and padding
    models = api(server.url, "/api/models")["models"]
    assert driver.find_element(By.ID, "model").get_attribute("value") == models[0]["name"]
    assert driver.find_element(By.ID, "model-info").text == "classification, tiny, 32 px, onnx"

    click_example(driver)
    # Croatia spans the map's whole width (not two thirds of it)
    panel, land = rect(driver, "#map"), rect(driver, "#land")
    assert land["width"] >= 0.9 * panel["width"] and land["height"] >= 0.85 * panel["height"], (land, panel)
    # the top cells: ranked on the map, darker when likelier, on a labelled scale, listed beside the map above the fold
    example = api(server.url, "/api/examples")["examples"][0]
    files = {v: base64.b64decode(example["views"][v].split(",", 1)[1]) for v in example["views"]}
    top = api(server.url, "/api/predict", files=files)["top"]
    fills = [r.get_attribute("fill") for r in driver.find_elements(By.CSS_SELECTOR, "#cells rect")]
    ranks = [t.text for t in driver.find_elements(By.CSS_SELECTOR, "#cells text.rank")]
    assert ranks == ["1", "2", "3", "4", "5"] and len(fills) == 5
    lightness = [luminance(f) for f in fills]
    assert all(a <= b + 1e-9 for a, b in zip(lightness, lightness[1:])), fills
    assert lightness[0] < 0.9  # the likeliest cell is not left pale
    scale = [t.text for t in driver.find_elements(By.CSS_SELECTOR, "#scale text")]
    assert scale[0] == "0%" and len(scale) == 3 and float(scale[-1].rstrip("%")) >= 100 * top[0]["probability"]
    rows = driver.find_elements(By.CSS_SELECTOR, "#top-cells tbody tr")
    assert [r.find_elements(By.TAG_NAME, "td")[1].text.split("\n")[0] for r in rows] == [
        f"{100 * t['probability']:.1f}%" for t in top]
    table = rect(driver, "#top-cells")
    assert table["left"] >= panel["right"] and table["top"] < panel["bottom"]  # beside the map
    assert table["bottom"] <= DESKTOP[1] and rect(driver, "#legend")["bottom"] <= DESKTOP[1]  # no scrolling
    path = tmp_path / "serve_page_1200x900.png"
    assert driver.save_screenshot(str(path))
    with Image.open(path) as image:
        assert image.size == DESKTOP
    print(f"\nscreenshot: {path}")


def test_phone_layout_one_column_without_sideways_scrolling(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    driver = open_page(browser, server.url, PHONE)
    click_example(driver)
    assert driver.execute_script("return document.documentElement.scrollWidth") <= PHONE[0]
    inputs, panel, answer = rect(driver, "#inputs"), rect(driver, "#map"), rect(driver, "#answer")
    assert inputs["bottom"] <= panel["top"] and panel["bottom"] <= answer["top"]  # stacked
    assert panel["width"] >= 0.85 * PHONE[0] and rect(driver, "#land")["width"] >= 0.9 * panel["width"]
    text_width, box_width = driver.execute_script("""
        const select = document.getElementById("model"), context = document.createElement("canvas").getContext("2d");
        context.font = getComputedStyle(select).font;
        return [context.measureText(select.selectedOptions[0].text).width, select.clientWidth];""")
    assert text_width + 20 <= box_width, (text_width, box_width)
    driver.execute_script("document.getElementById('map-panel').scrollIntoView()")  # the answer, as a phone shows it
    path = tmp_path / "serve_page_390x844.png"
    assert driver.save_screenshot(str(path))
    with Image.open(path) as image:
        assert image.size == PHONE
    assert len(driver.find_elements(By.CSS_SELECTOR, "#top-cells tbody tr")) == 5
    print(f"\nscreenshot: {path}")


def test_a_regression_model_shows_its_point_without_cells(server, browser, demo_dir):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver = open_page(browser, server.url, DESKTOP)
    regression = api(server.url, "/api/models")["models"][1]
    Select(driver.find_element(By.ID, "model")).select_by_value(regression["name"])
    assert driver.find_element(By.ID, "model-info").text.startswith("regression, tiny, 32 px")
    folder = sorted((demo_dir / "data").iterdir())[3]
    for view in VIEWS:
        driver.find_element(By.ID, f"file-{view}").send_keys(str(folder / f"{view}.jpg"))
    driver.find_element(By.ID, "predict").click()
    wait_for(driver, lambda d: "regression model" in d.find_element(By.ID, "details").text)
    answer = api(server.url, "/api/predict", folder, params={"model": regression["name"]})
    coords = driver.find_element(By.ID, "coords")
    assert float(coords.get_attribute("data-lat")) == pytest.approx(answer["latitude"], abs=1e-9)
    assert not driver.find_elements(By.CSS_SELECTOR, "#cells rect")
    assert not driver.find_element(By.ID, "top-cells").is_displayed()
    # its regions come from the val residuals
    assert driver.find_element(By.ID, "confidence").text.startswith(
        f"90% sure it is within {km_text(answer['radius90_km'])} km")
    assert driver.find_element(By.ID, "region-90")
    assert not driver.find_element(By.ID, "scale-box").is_displayed()


def test_the_page_has_no_inline_script_or_handler(server):
    """Everything the page runs comes from /static/app.js (a Content-Security-Policy of 'self' scripts holds)."""
    async def page():
        async with aiohttp.ClientSession() as session:
            async with session.get(server.url + "/") as response:
                return await response.text()
    html = asyncio.run(page())
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", html, flags=re.S | re.I)
    assert scripts and all('src="/static/' in attributes and not body.strip() for attributes, body in scripts)
    assert not re.search(r"\son[a-z]+\s*=", html, flags=re.I) and "javascript:" not in html
    assert "<style" not in html and 'style="' not in html  # the style sheet is /static/app.css
