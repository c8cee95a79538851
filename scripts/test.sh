#!/usr/bin/env bash
# The README's test command (`npm test`): cargo tests of the core, then the ava suite, then
# one plain closing line `N passed, N failed` that CI reads (it does not parse ava's summary).
# Needs root (criu, userfaultfd) and a built package (`npm run build`).
set -uo pipefail
cd "$(dirname "$0")/.."

log=$(mktemp -d)
trap 'rm -rf "$log"' EXIT

echo "== cargo test (core)"
cargo test --workspace 2>&1 | tee "$log/cargo.txt"
cargo_rc=${PIPESTATUS[0]}

echo "== ava"
# TAP output gives exact pass/fail counts to add up below; the human summary is printed too.
npx ava --tap "$@" 2>&1 | tee "$log/ava.txt"
ava_rc=${PIPESTATUS[0]}

cargo_pass=$(grep -Eo '^test result: [a-zA-Z]+\. [0-9]+ passed' "$log/cargo.txt" | awk '{s+=$4} END{print s+0}')
cargo_fail=$(grep -Eo '[0-9]+ failed;' "$log/cargo.txt" | awk '{s+=$1} END{print s+0}')
ava_pass=$(grep -E '^# pass [0-9]+' "$log/ava.txt" | awk '{s+=$3} END{print s+0}')
ava_fail=$(grep -E '^# fail [0-9]+' "$log/ava.txt" | awk '{s+=$3} END{print s+0}')

# A runner that crashed before reporting must not read as green.
[ "$cargo_rc" -ne 0 ] && [ "$cargo_fail" -eq 0 ] && cargo_fail=1
[ "$ava_rc" -ne 0 ] && [ "$ava_fail" -eq 0 ] && ava_fail=1

echo "cargo: $cargo_pass passed, $cargo_fail failed; ava: $ava_pass passed, $ava_fail failed"
echo "$((cargo_pass + ava_pass)) passed, $((cargo_fail + ava_fail)) failed"
[ "$cargo_rc" -eq 0 ] && [ "$ava_rc" -eq 0 ]
