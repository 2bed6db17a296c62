"""The web playground: a chat page at `/` over the server's own API.

    app = create_app(engine)        # calls install_playground(app)

`/` answers serving/static/playground.html; `/playground/*` serves its script and style. The page
is plain HTML/JS (no build step, no outside URLs: its Content-Security-Policy allows the same
origin only). It streams replies from POST /v1/chat/completions and polls GET /v1/stats, sending
`Authorization: Bearer <key>` when the user types a key, so the page itself needs no key while the
API stays guarded.
"""

from __future__ import annotations

import pathlib

from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = pathlib.Path(__file__).parent / "static"
PAGE = "playground.html"
STATIC_PREFIX = "/playground"

# Same origin for everything: the page cannot fetch, post to or embed anything from elsewhere.
CONTENT_SECURITY_POLICY = ("default-src 'self'; connect-src 'self'; script-src 'self'; "
                           "style-src 'self'; img-src 'self' data:; base-uri 'none'; "
                           "form-action 'none'; frame-ancestors 'none'")


def install_playground(app: FastAPI) -> None:
    """Add GET `/` (the page) and `/playground/*` (its files) to `app`. Raises FileNotFoundError
    if the package was installed without its static files."""
    page = STATIC_DIR / PAGE
    if not page.is_file():
        raise FileNotFoundError(f"the playground page {page} is missing: the package was installed "
                                "without serving/static/ (see package-data in pyproject.toml)")
    html = page.read_text(encoding="utf-8")
    headers = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "Cache-Control": "no-cache",
               "X-Content-Type-Options": "nosniff"}

    @app.get("/", include_in_schema=False)
    async def playground():
        return HTMLResponse(html, headers=headers)

    app.mount(STATIC_PREFIX, StaticFiles(directory=STATIC_DIR), name="playground")


__all__ = ["install_playground", "STATIC_DIR"]
