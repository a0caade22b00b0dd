#!/usr/bin/env bash
# Debian's chromium for the browser tests (tests/test_serve.py drives it with Playwright; Playwright's
# own browser download is never used). Idempotent: does nothing when chromium is already there.
# Installs with apt-get as root (CI), or through passwordless sudo; otherwise says what to run and fails.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" = 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
else
    echo "ensure_chromium: chromium is missing and this user cannot install it; run as root:" >&2
    echo "  apt-get update && apt-get install -y chromium" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq chromium >/dev/null
command -v chromium >/dev/null 2>&1 || { echo "ensure_chromium: apt-get did not provide chromium" >&2; exit 1; }
echo "ensure_chromium: $(chromium --version 2>/dev/null | tail -1)"
