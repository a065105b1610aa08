#!/usr/bin/env bash
# Debian packages hrf-batch needs beside Python: the PostgreSQL 15 server (the tests run on both
# database backends), Pango (PDF reports) and Chromium with its driver (the review page's browser
# tests) are required; HarfBuzz-subset (smaller PDF fonts) and
# poppler-utils (to look at rendered PDFs) are optional. Installs only what is missing.
set -euo pipefail
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
need=(); want=()
[ -x /usr/lib/postgresql/15/bin/initdb ] || need+=(postgresql)
ldconfig -p | grep -q libpangoft2-1.0 || need+=(libpango-1.0-0 libpangoft2-1.0-0)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
ldconfig -p | grep -q libharfbuzz-subset || want+=(libharfbuzz-subset0)
command -v pdftoppm >/dev/null 2>&1 || want+=(poppler-utils)
if [ $(( ${#need[@]} + ${#want[@]} )) -gt 0 ]; then
  $SUDO apt-get update -q || echo "warning: apt-get update failed; trying with the package lists at hand" >&2
fi
if [ ${#need[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${need[@]}"
fi
if [ ${#want[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${want[@]}" \
    || echo "warning: optional packages ${want[*]} not installed; reports still render" >&2
fi
