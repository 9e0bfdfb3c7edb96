#!/usr/bin/env bash
# Property-based test of the HTTP API against its own OpenAPI document:
# installs schemathesis from PyPI into a venv under target/ (once), starts a
# real `herald serve` on a temporary data directory and free ports, and runs
# every check (all phases, the stateful one included) against
# /v1/openapi.json with the admin key. Exits non-zero on any failure.
#
#   .ci/schemathesis.sh                 # default: 40 examples per operation
#   EXAMPLES=200 .ci/schemathesis.sh    # a longer run
#   SEED=1234 .ci/schemathesis.sh       # reproduce a run
set -euo pipefail
cd "$(dirname "$0")/.."

examples="${EXAMPLES:-40}"
venv=target/schemathesis-venv
version="schemathesis>=4.32,<5"
# A Python of 3.12 or later when there is one: under 3.11, schemathesis'
# generator now and then trips over a CPython bug ("AST constructor recursion
# depth mismatch").
python=""
for candidate in python3.13 python3.12 \
    "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.13*/bin/python3 \
    "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import venv' 2>/dev/null; then
        python="$candidate"
        break
    fi
done
python="${python:-python3}"
if [ ! -x "$venv/bin/schemathesis" ]; then
    echo "== installing $version into $venv (with $("$python" --version))"
    "$python" -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "$version"
fi
"$venv/bin/schemathesis" --version

echo "== building herald"
cargo build -q --locked --bin herald

dir=$(mktemp -d)
server_pid=""
cleanup() {
    if [ -n "$server_pid" ]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    rm -rf "$dir"
}
trap cleanup EXIT

# A generous publish rate, so the fuzzer's posts are not refused with 429
# (429 is documented, but a run full of them tests little).
cat > "$dir/herald.toml" <<EOF
[limits]
publish_per_sec = 100000.0
publish_burst = 100000
EOF
target/debug/herald serve --config "$dir/herald.toml" --data-dir "$dir/data" \
    --quic-addr 127.0.0.1:0 --http-addr 127.0.0.1:0 > "$dir/out" 2> "$dir/err" &
server_pid=$!
for _ in $(seq 1 300); do
    if grep -q '^herald listening:' "$dir/out"; then break; fi
    if ! kill -0 "$server_pid" 2>/dev/null; then cat "$dir/err"; exit 1; fi
    sleep 0.1
done
http=$(awk '/^herald listening:/ { print $6 }' "$dir/out")
[ -n "$http" ] || { echo "herald did not start"; cat "$dir/err"; exit 1; }
key=$(cat "$dir/data/admin.key")
echo "== herald on http://$http"

seed_args=()
if [ -n "${SEED:-}" ]; then seed_args=(--seed "$SEED"); fi
# Run from a directory under target/: schemathesis and hypothesis keep
# their caches (.schemathesis/, .hypothesis/) in the working directory.
root=$(pwd)
mkdir -p target/schemathesis-run
run_schemathesis() {
    (cd target/schemathesis-run && "$root/$venv/bin/schemathesis" \
        --config-file "$root/.ci/schemathesis.toml" \
        run "http://$http/v1/openapi.json" \
        --checks all \
        --phases examples,coverage,fuzzing,stateful \
        --header "Authorization: Bearer $key" \
        --max-examples "$examples" \
        --workers 2 \
        --request-timeout 10 \
        --generation-database none \
        --no-color \
        "${seed_args[@]}") 2>&1 | tee "$dir/schemathesis.out"
    return "${PIPESTATUS[0]}"
}
status=0
run_schemathesis || status=$?
# schemathesis itself sometimes fails inside its own data generation (a
# "Runtime Error" such as CPython's "AST constructor recursion depth
# mismatch"), which says nothing about the API. Only when that is the whole
# story (no API failure reported) is the run repeated once, with a new seed.
if [ "$status" -ne 0 ] && ! grep -q '^Failures:' "$dir/schemathesis.out" \
    && grep -q 'Runtime Error' "$dir/schemathesis.out" && [ -z "${SEED:-}" ]; then
    echo "== schemathesis failed inside its own generator (no API failure); running it once more"
    status=0
    run_schemathesis || status=$?
fi
if ! kill -0 "$server_pid" 2>/dev/null; then
    echo "herald died during the run:"; cat "$dir/err"; exit 1
fi
exit "$status"
