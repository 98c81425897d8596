#!/usr/bin/env bash
# Installs Debian's Chromium for the web page's browser test when it is missing and we are root.
# Playwright drives this system browser; it never downloads a browser of its own.
set -u
command -v chromium >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) && exit 0
fi
exit 1
