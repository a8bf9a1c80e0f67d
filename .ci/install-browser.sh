#!/usr/bin/env bash
# Install Debian's chromium for the browser test (tests/test_browser.py), if it is missing.
# The test drives /usr/bin/chromium through Python playwright; never `playwright install`.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
    echo "chromium present: $(/usr/bin/chromium --version 2>/dev/null || true)"
    exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends chromium fonts-liberation
/usr/bin/chromium --version
