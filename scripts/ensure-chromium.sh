#!/usr/bin/env bash
# The progress page's browser test (tests/kombinat/test_progress_page.py) drives Debian's Chromium through
# Playwright (which never downloads a browser of its own). Installs the package when /usr/bin/chromium is
# missing, so `make test` works on a fresh CI machine (which runs as root); does nothing otherwise.
set -euo pipefail

CHROMIUM=${EMBEDKOMB_CHROMIUM:-/usr/bin/chromium}
[ -x "$CHROMIUM" ] && exit 0

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo"
    else
        echo "ensure-chromium: $CHROMIUM is missing and installing it needs root: sudo apt-get install -y chromium" >&2
        exit 1
    fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-chromium: $CHROMIUM is missing and there is no apt-get here; install Chromium and set EMBEDKOMB_CHROMIUM" >&2
    exit 1
fi

echo "ensure-chromium: installing Debian's chromium (the browser test needs it)"
export DEBIAN_FRONTEND=noninteractive
# A fresh machine may have no package lists yet; only then is the update worth its time.
$SUDO apt-get install -y chromium || { $SUDO apt-get update && $SUDO apt-get install -y chromium; }
[ -x "$CHROMIUM" ] || { echo "ensure-chromium: apt-get finished but $CHROMIUM is still missing" >&2; exit 1; }
