#!/usr/bin/env bash
# Install what the serve page's browser test needs: Debian's chromium (driven by Playwright for Python).
# Idempotent: does nothing when /usr/bin/chromium already exists. Never runs `playwright install`
# (that downloads a browser build of its own, which cannot be fetched here); the test launches
# /usr/bin/chromium through Playwright's executable_path instead.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  echo "chromium present: $(/usr/bin/chromium --version 2>/dev/null || echo /usr/bin/chromium)"
  exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core
/usr/bin/chromium --version
