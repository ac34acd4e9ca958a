"""Run a web build's page in a real headless Chromium: a local static server for the folder, the system's
Chromium and ChromeDriver driven by selenium, the page's automation interface (URL parameters, `autorun=1`,
`<img id="result">`, `<pre id="timings">`) read back.

WebGPU runs here without a GPU through SwiftShader (`--enable-unsafe-webgpu --use-webgpu-adapter=swiftshader`):
an adapter without `shader-f16`, so FP32 graphs run on the WebGPU provider and FP16 ones are refused by the page.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import http.server
import json
import os
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlencode

from diffship.errors import DiffshipError

WEBGPU_FLAGS = ("--enable-unsafe-webgpu", "--use-webgpu-adapter=swiftshader", "--enable-features=Vulkan")


@dataclass
class PageRun:
    """What the page ended with: its state ("done" / "error"), the backend line, status text, timings and image."""

    state: str
    backend: str
    status: str
    timings: dict[str, Any]
    png: bytes | None
    console: list[str]
    browser: str = ""


def find_browser() -> tuple[str, str] | None:
    """Chromium and ChromeDriver (DIFFSHIP_CHROMIUM / DIFFSHIP_CHROMEDRIVER, else on PATH), or None."""
    browser = os.environ.get("DIFFSHIP_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    driver = os.environ.get("DIFFSHIP_CHROMEDRIVER") or shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def browser_unavailable() -> str | None:
    """Why the page cannot be run here, or None."""
    try:
        import selenium  # noqa: F401  optional: web
    except ImportError:
        return "selenium is not installed (pip install 'diffship[web]')"
    if find_browser() is None:
        return "no Chromium and ChromeDriver on PATH (Debian: apt-get install chromium chromium-driver)"
    return None


class _Handler(http.server.SimpleHTTPRequestHandler):
    extra: ClassVar[dict[str, Path]] = {}  # URL prefix -> another folder served under it
    extensions_map: ClassVar[dict[str, str]] = {**http.server.SimpleHTTPRequestHandler.extensions_map, ".mjs": "text/javascript",
                      ".js": "text/javascript", ".wasm": "application/wasm", ".onnx": "application/octet-stream",
                      ".npy": "application/octet-stream"}

    def translate_path(self, path: str) -> str:
        for prefix, folder in self.extra.items():
            if path.startswith(f"/{prefix}/"):
                return str(folder / Path(path.split("?", 1)[0]).name)
        return super().translate_path(path)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def serve(folder: Path, extra: dict[str, Path] | None = None) -> Iterator[str]:
    """Serve `folder` (and each `extra` folder under its URL prefix, without writing into `folder`) on a free localhost
    port for the duration; yields its base URL."""
    handler_class = type("Handler", (_Handler,), {"extra": dict(extra or {})})
    handler = functools.partial(handler_class, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def run_page(folder: Path, params: dict[str, Any], webgpu: bool = False, timeout: float = 600.0,
             extra: dict[str, Path] | None = None) -> PageRun:
    """Open the web build in `folder` with URL `params` (autorun=1 added) in headless Chromium and wait for it to
    finish; the page's result, whatever it was (a failure on the page is a PageRun with state "error")."""
    if reason := browser_unavailable():
        raise DiffshipError(f"Cannot run the web page: {reason}.")
    from selenium import webdriver  # optional: web
    from selenium.webdriver.chrome.service import Service  # optional: web
    from selenium.webdriver.common.by import By  # optional: web
    from selenium.webdriver.support.ui import WebDriverWait  # optional: web

    browser, driver_path = find_browser()  # type: ignore[misc]
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu-sandbox",
                 *(WEBGPU_FLAGS if webgpu else ())):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    with serve(folder, extra) as base:
        driver = webdriver.Chrome(options=options, service=Service(driver_path))
        try:
            driver.set_script_timeout(timeout)
            driver.get(f"{base}index.html?{urlencode({**params, 'autorun': 1})}")
            state = lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state")  # noqa: E731
            WebDriverWait(driver, timeout, poll_frequency=0.5).until(lambda d: state(d) in ("done", "error"))
            text = {i: driver.find_element(By.ID, i).text for i in ("backend", "status")}
            timings = driver.find_element(By.ID, "timings").get_attribute("textContent") or "{}"
            src = driver.find_element(By.ID, "result").get_attribute("src") or ""
            console = [entry["message"] for entry in driver.get_log("browser")]
            png = base64.b64decode(src.split(",", 1)[1]) if src.startswith("data:image/png;base64,") else None
            version = f"{driver.capabilities.get('browserName', 'chrome')} {driver.capabilities.get('browserVersion', '')}"
            return PageRun(state(driver), text["backend"], text["status"], json.loads(timings), png, console, version)
        finally:
            driver.quit()
