#!/usr/bin/env bash
# Runs every fuzz target in the module for a short, count-based budget.
# Count-based (-fuzztime=Nx) on purpose: a duration budget races Go 1.26's
# fuzz coordinator on a loaded machine and fails with a bare "context
# deadline exceeded" and no crasher (golang/go#75804, fixed in Go 1.27).
set -euo pipefail
cd "$(dirname "$0")/.."
budget="${FUZZTIME:-100000x}"
status=0
while IFS=: read -r file fn; do
  dir="./$(dirname "$file")"
  echo "fuzz: ${fn} in ${dir} (${budget})"
  if ! go test -run='^$' -fuzz="^${fn}\$" -fuzztime="${budget}" "${dir}" > /tmp/sidelane-fuzz.$$ 2>&1; then
    cat /tmp/sidelane-fuzz.$$
    status=1
  fi
done < <(grep -rHoE --include='*_test.go' '^func (Fuzz[A-Za-z0-9_]+)' . | sed -E 's/:func /:/; s#^\./##' | sort)
rm -f /tmp/sidelane-fuzz.$$
exit "${status}"
