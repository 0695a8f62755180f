#!/usr/bin/env bash
# Fails when git tracks a file over 1 MiB that is not on the allow-list:
# build outputs (binaries, archives, images) do not belong in the repository.
# The allow-list is the generated BPF objects, committed on purpose so a
# fresh machine builds without clang.
set -euo pipefail
limit=$((1024 * 1024))
allow='(^|/)[^/]*_bpfel\.o$'
bad=0
while IFS= read -r -d '' f; do
  [[ -f "$f" ]] || continue
  size=$(stat -c %s "$f")
  if (( size > limit )) && ! [[ "$f" =~ $allow ]]; then
    echo "large tracked file: $f ($size bytes > $limit); build outputs belong in bin/ (ignored)" >&2
    bad=1
  fi
done < <(git ls-files -z)
exit "$bad"
