#!/usr/bin/env bash
# Build doproxy as a user gets it and run what was built, both ways:
#   1. `python -m build`: an sdist, and from it a wheel with the data plane compiled (mypyc);
#   2. a wheel from that sdist with no C compiler (CC=/bin/false): pure Python, py3-none-any.
# Each wheel is installed in a fresh venv and run from outside the source tree: --version,
# `check` on a minimal config, and a real request proxied to a backend, then SIGTERM.
#
# Usage: scripts/check-packaging.sh        (PYTHON=path/to/python, default .venv/bin/python;
#                                           it needs `build`, in the dev extra)
#        KEEP=1 scripts/check-packaging.sh  keeps the temporary folder and says where it is
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=$PWD
PYTHON=${PYTHON:-.venv/bin/python}
if ! "$PYTHON" -m build --version >/dev/null 2>&1; then
  echo "check-packaging: $PYTHON has no 'build'; install the dev extra: pip install -e '.[dev]'" >&2
  exit 1
fi
PYTHON=$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")

TMP=$(mktemp -d "${TMPDIR:-/tmp}/doproxy-packaging.XXXXXX")
if [ -n "${KEEP:-}" ]; then
  trap 'echo "check-packaging: kept $TMP"' EXIT
else
  trap 'rm -rf "$TMP"' EXIT
fi
START=$SECONDS
step() { printf '== [%3ds] %s\n' $((SECONDS - START)) "$*"; }
fail() { echo "check-packaging: FAILED: $*" >&2; exit 1; }

step "python -m build: sdist, then a wheel built from it (compiled)"
"$PYTHON" -m build --outdir "$TMP/dist" "$SRC" >"$TMP/build.log" 2>&1 ||
  { tail -40 "$TMP/build.log"; fail "python -m build (log above)"; }
sdists=("$TMP"/dist/doproxy-*.tar.gz)
wheels=("$TMP"/dist/doproxy-*.whl)
[ ${#sdists[@]} = 1 ] && [ -f "${sdists[0]}" ] || fail "expected one sdist in $TMP/dist"
[ ${#wheels[@]} = 1 ] && [ -f "${wheels[0]}" ] || fail "expected one wheel in $TMP/dist"
SDIST=${sdists[0]}
COMPILED_WHEEL=${wheels[0]}
case "$COMPILED_WHEEL" in
  *-cp3*-linux_*.whl) ;;
  *) fail "the build did not compile the data plane: $(basename "$COMPILED_WHEEL") (no C compiler or Python headers here? see $TMP/build.log)" ;;
esac

step "the sdist has what a build from it needs"
listing=$(tar tzf "$SDIST")
base=$(basename "$SDIST" .tar.gz)
for f in setup.py pyproject.toml MANIFEST.in README.md doproxy/__init__.py doproxy/_compiled.py \
  doproxy/testing/digitalocean-openapi-subset.yaml doproxy/testing/LICENSE-openapi \
  tests/conftest.py tests/data/go-2015/doproxy.toml docs/deploy.md deploy/doproxy.service \
  deploy/Dockerfile; do
  grep -qx "$base/$f" <<<"$listing" || fail "the sdist lacks $f"
done
# Every file the wheel's package holds comes from the sdist (package data included).
for f in $(unzip -Z1 "$COMPILED_WHEEL" | grep '^doproxy/' | grep -v '\.so$'); do
  grep -qx "$base/$f" <<<"$listing" || fail "the sdist lacks $f, which the wheel has"
done

step "a wheel from the sdist with no C compiler (CC=/bin/false): pure Python"
CC=/bin/false "$PYTHON" -m build --wheel --outdir "$TMP/pure" "$SDIST" >"$TMP/build-pure.log" 2>&1 ||
  { tail -40 "$TMP/build-pure.log"; fail "the build without a compiler (log above)"; }
PURE_WHEEL=$(echo "$TMP"/pure/doproxy-*-py3-none-any.whl)
[ -f "$PURE_WHEEL" ] || fail "expected a py3-none-any wheel, got: $(ls "$TMP/pure")"
if unzip -Z1 "$PURE_WHEEL" | grep -q '\.so$'; then fail "the pure wheel holds compiled code"; fi

# The smallest configuration that serves: one backend (started by the smoke test), loopback.
mkdir -p "$TMP/conf"
printf 'bind = "127.0.0.1:0"\ninventory-file = "inventory.toml"\n[admin]\nbind = "127.0.0.1:0"  # port 0: never collides with a doproxy already on 8001\n' >"$TMP/conf/doproxy.toml"
printf '[[backend]]\nid = 1\nname = "smoke"\nserver-host = "127.0.0.1:1"\n' >"$TMP/conf/inventory.toml"
cat >"$TMP/smoke.py" <<'EOF'
"""Serve through the installed doproxy: a backend, the proxy, one request, SIGTERM."""

import http.server
import pathlib
import queue
import re
import signal
import subprocess
import sys
import threading
import urllib.request


class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"hello from the backend\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


doproxy, folder = sys.argv[1], pathlib.Path(sys.argv[2])
backend = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
threading.Thread(target=backend.serve_forever, daemon=True).start()
(folder / "inventory.toml").write_text(
    f'[[backend]]\nid = 1\nname = "smoke"\nserver-host = "127.0.0.1:{backend.server_port}"\n'
)
proxy = subprocess.Popen(
    [doproxy, "--config", str(folder / "doproxy.toml")], stderr=subprocess.PIPE, text=True
)
lines: queue.Queue[str] = queue.Queue()
threading.Thread(target=lambda: [lines.put(ln) for ln in proxy.stderr], daemon=True).start()
try:
    while True:  # readiness: its "listening on" line
        line = lines.get(timeout=30)
        sys.stderr.write("  doproxy: " + line)
        if m := re.search(r"listening on ([0-9.]+):(\d+)", line):
            break
    with urllib.request.urlopen(f"http://{m[1]}:{m[2]}/", timeout=10) as r:
        assert r.status == 200 and r.read() == b"hello from the backend\n", r.status
    print(f"  proxied GET / -> {r.status}")
    proxy.send_signal(signal.SIGTERM)
    assert proxy.wait(timeout=30) == 0, proxy.returncode
    print("  SIGTERM: exited 0")
finally:
    if proxy.poll() is None:
        proxy.kill()
EOF

smoke() {  # smoke WHEEL EXPECTED_COMPILED
  local wheel=$1 expected=$2 venv
  venv="$TMP/venv-$expected"
  step "install $(basename "$wheel") in a fresh venv"
  "$PYTHON" -m venv "$venv"
  "$venv/bin/python" -m pip install -q "$wheel" >"$TMP/pip-$expected.log" 2>&1 ||
    { tail -20 "$TMP/pip-$expected.log"; fail "pip install $(basename "$wheel")"; }
  step "run it (from outside the source tree)"
  (
    cd "$TMP"
    "$venv/bin/doproxy" --version
    "$venv/bin/doproxy" check --config conf/doproxy.toml
    compiled=$("$venv/bin/python" -c 'import doproxy.proxy as p; print(p.compiled())')
    echo "  doproxy.proxy.compiled() = $compiled"
    [ "$compiled" = "$expected" ] || fail "compiled() is $compiled, expected $expected"
    "$venv/bin/python" smoke.py "$venv/bin/doproxy" conf
  )
}

smoke "$COMPILED_WHEEL" True
smoke "$PURE_WHEEL" False
step "ok: $(basename "$SDIST"), $(basename "$COMPILED_WHEEL"), $(basename "$PURE_WHEEL")"
