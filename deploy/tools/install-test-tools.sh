#!/usr/bin/env bash
# Tools the tests need beyond Python (run by `make tools`, a prerequisite of `make test`):
#  - promtool, which checks the alert rules (tests/unit/test_observability.py): from Debian's
#    `prometheus` package at a pinned version, unpacked into .cache/bin (about a second, no
#    daemon is installed, no root needed). Without apt, `go install` builds it at a pinned
#    version instead: measured here (2 cores, 2026-11-29) at 12 min and 1.8 GB of modules, too
#    slow for every CI run; that build (Prometheus 3) passes the same checks and rule tests.
#  - redis-server, the shared rate-limit storage the tests start on a port of their own
#    (tests/unit/test_ratelimit.py): Debian's `redis-server`, installed when missing (root).
# A tool that cannot be had is reported here; its tests then skip with the reason, except in CI
# (CI=true), where they fail.
set -uo pipefail
cd "$(dirname "$0")/../.."
BIN=.cache/bin
PROMETHEUS_DEB=2.42.0+ds-5+deb12u1
PROMTOOL_GO=github.com/prometheus/prometheus/cmd/promtool@v0.316.0
mkdir -p "$BIN"

have_promtool() { [ -x "$BIN/promtool" ] && "$BIN/promtool" --version >/dev/null 2>&1; }

if ! have_promtool && command -v apt-get >/dev/null; then
  tmp=$(mktemp -d)
  fetch() { (cd "$tmp" && apt-get download -q "prometheus=$PROMETHEUS_DEB" >/dev/null 2>&1); }
  if ! fetch && [ "$(id -u)" = 0 ]; then apt-get update -q >/dev/null 2>&1; fetch; fi
  deb=$(ls "$tmp"/prometheus_*.deb 2>/dev/null | head -1)
  if [ -n "$deb" ]; then
    dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$tmp" ./usr/bin/promtool && mv "$tmp/usr/bin/promtool" "$BIN/promtool"
  fi
  rm -rf "$tmp"
fi
if ! have_promtool && command -v go >/dev/null; then
  echo "building promtool with go install ($PROMTOOL_GO), once; this takes minutes"
  GOBIN="$PWD/$BIN" go install "$PROMTOOL_GO"
fi
have_promtool && echo "promtool: $("$BIN/promtool" --version 2>&1 | head -1)" || echo "promtool: not available"

if ! command -v redis-server >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get install -y -q --no-install-recommends redis-server >/dev/null 2>&1 ||
      { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends redis-server >/dev/null 2>&1; })
  fi
fi
command -v redis-server >/dev/null && echo "redis-server: $(redis-server --version | cut -d' ' -f3)" ||
  echo "redis-server: not available (install Debian's redis-server package)"
exit 0
