"""The headless Chromium that bench_views and the view tests (tests/views_fixtures.py) drive through Playwright."""

from __future__ import annotations

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
]
"""Launch flags: no sandbox or GPU (containers), and no background traffic of Chromium's own."""
