#!/usr/bin/env bash
# What the web target needs outside Python, installed by `make setup`: the npm packages its app copies
# (onnxruntime-web, @huggingface/tokenizers; web/package-lock.json pins them) and, for the browser tests and the
# build's in-browser check, Debian's Chromium and ChromeDriver (system packages; nothing downloads a browser).
# Either may be missing on a machine without npm or root: the web target then says what is missing, and its
# browser tests skip with the reason.
set -uo pipefail
cd "$(dirname "$0")/.."
if command -v npm >/dev/null; then
    npm ci --prefix web --no-audit --no-fund --ignore-scripts --loglevel=error || echo "npm ci in web/ failed: the web app will be unavailable" >&2
else
    echo "npm not found: the web target's app will be unavailable (install Node.js 18 or newer)" >&2
fi
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
        || echo "apt-get could not install chromium chromium-driver: browser tests will skip" >&2
else
    echo "chromium / chromedriver not found (Debian: apt-get install chromium chromium-driver): browser tests will skip" >&2
fi
exit 0
