"""Open the built site's front page, the API reference and every gallery page in headless Chromium; fail on any
page error.

``python docs/check_pages.py docs/_build/html`` (the ``docs`` nox session runs it after the build). A page fails
on a JavaScript exception, a console error, a request that fails or answers 400 or more, a request that leaves
localhost, an image that did not load, or (for the examples that draw) no figure. The pages are served from a
local HTTP server, as ``python -m http.server`` or a static host would. Chromium is Debian's (``apt-get install
chromium``), driven by Playwright; where it is missing the check says so and exits 0, unless
``MHA_CUPY_REQUIRE_BROWSER=1`` (CI) makes that a failure. Screenshots go to ``<site>/../check/``, beside the site.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import sys
import threading
from pathlib import Path
from urllib.parse import urlparse

#: The pages checked beside every gallery page.
PAGES = ("index.html", "api/mha_cupy.html", "gallery/index.html")
#: The gallery pages that must show a figure their example drew at build time.
FIGURES = ("compare_backends_dtypes", "time_and_memory_vs_length", "tabpfn_backend")
#: Chromium as Debian installs it, with the flags a closed machine needs (no background connections).
CHROMIUM_FLAGS = ("--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")


def chromium() -> str | None:
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        """Nothing: the check reports what failed, not every request."""


def serve(root: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = functools.partial(_Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def check(page, url: str, shot: Path, *, figure: bool) -> list[str]:  # noqa: ANN001  a Playwright page
    problems: list[str] = []
    host = urlparse(url).netloc
    page.on("pageerror", lambda exc: problems.append(f"JavaScript error: {exc}"))
    page.on("console", lambda m: m.type == "error" and problems.append(f"console error: {m.text}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url} ({r.failure})"))
    page.on("response", lambda r: r.status >= 400 and problems.append(f"HTTP {r.status}: {r.url}"))
    page.on("request", lambda r: urlparse(r.url).netloc not in ("", host) and not r.url.startswith("data:")
            and problems.append(f"request leaves the site: {r.url}"))
    page.goto(url, wait_until="networkidle")
    broken = page.evaluate("[...document.images].filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src)")
    problems += [f"image not loaded: {src}" for src in broken]
    if figure and not page.locator("img.sphx-glr-single-img, img.sphx-glr-multi-img").count():
        problems.append("no figure: the example drew none")
    if not page.title():
        problems.append("the page has no title")
    page.screenshot(path=str(shot), full_page=False)
    return problems


def main(argv: list[str]) -> int:
    site = Path(argv[1] if len(argv) > 1 else "docs/_build/html").resolve()
    exe = chromium()
    if exe is None:
        message = "check_pages: no Chromium here (apt-get install chromium): the browser check did not run"
        if os.environ.get("MHA_CUPY_REQUIRE_BROWSER"):
            print(message + ", and MHA_CUPY_REQUIRE_BROWSER is set", file=sys.stderr)
            return 1
        print(message, file=sys.stderr)
        return 0
    from playwright.sync_api import sync_playwright

    gallery = sorted(f"gallery/{p.name}" for p in (site / "gallery").glob("*.html") if p.name != "index.html")
    missing = [p for p in (*PAGES, *(f"gallery/{f}.html" for f in FIGURES)) if not (site / p).is_file()]
    if missing:
        print(f"check_pages: not built: {missing} under {site}", file=sys.stderr)
        return 1
    shots = site.parent / "check"
    shots.mkdir(exist_ok=True)
    server, base = serve(site)
    failed = 0
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=exe, args=list(CHROMIUM_FLAGS))
            for name in (*PAGES, *gallery):
                page = browser.new_page()
                shot = shots / (name.replace("/", "-").removesuffix(".html") + ".png")
                problems = check(page, base + name, shot, figure=Path(name).stem in FIGURES)
                page.close()
                failed += bool(problems)
                print(f"check_pages: {name}: " + ("ok" if not problems else "FAILED\n  " + "\n  ".join(problems)))
            print(f"check_pages: {browser.version} (Chromium at {exe}); screenshots in {shots}")
            browser.close()
    finally:
        server.shutdown()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
