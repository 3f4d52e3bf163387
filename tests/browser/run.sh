#!/usr/bin/env bash
# Runs the dashboard's browser test: installs Debian's chromium when it is
# missing (never a downloaded browser), playwright-core from package-lock.json,
# builds the server, then runs tests/browser/dashboard.test.mjs.
# Idempotent: each step is skipped or cheap when already done.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

if [ ! -x /usr/bin/chromium ]; then
  echo "browser test: installing Debian's chromium"
  as_root apt-get update
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium
fi

cd "$here"
want="$(node -p 'require("./package.json").dependencies["playwright-core"]')"
have="$(node -p 'try { require("./node_modules/playwright-core/package.json").version } catch { "" }')"
if [ "$have" != "$want" ]; then
  # playwright-core only: it never downloads a browser.
  PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund
fi

(cd "$root" && cargo build -p proxypal-server)

export PROXYPAL_BIN="${PROXYPAL_BIN:-$root/target/debug/proxypal-server}"
exec node dashboard.test.mjs
