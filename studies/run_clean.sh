#!/usr/bin/env bash
# Run study specs from a clean clone of this repository's HEAD, caching into its committed cell store, so that
# every cell records a clean commit (run here, the new cells themselves would make the checkout dirty).
#   studies/run_clean.sh studies/lm-convergence.toml [more specs...]
# Uses the python on PATH (with gradest's requirements installed); JOBS=1 for one cell at a time, PROFILE=quick
# for a profile other than full, REV=<commit> to compute at an earlier commit (to finish a study at the commit
# its first cells used; a spec of this repository is then read as it was at that commit, whose code may not know
# keys added since), ARGS='--shard 1/6' for more `study run` options (e.g. to run the two arms of one seed
# side by side, so that pairs finish together).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
clone="$(mktemp -d)/gradest"
git clone -q "$repo" "$clone"
if [ -n "${REV:-}" ]; then git -C "$clone" checkout -q "$REV"; fi
echo "cells computed at $(git -C "$clone" rev-parse --short HEAD), into $repo/studies/cells"
for spec in "$@"; do
  spec="$(cd "$(dirname "$spec")" && pwd)/$(basename "$spec")"
  if [ -n "${REV:-}" ] && [ "${spec#"$repo"/}" != "$spec" ]; then spec="$clone/${spec#"$repo"/}"; fi
  echo "=== $(date -u +%H:%M:%S) $spec"
  (cd "$clone" && PYTHONPATH="$clone" GRADEST_RESULTS="$repo/studies/cells" \
     python -m gradest.cli study run "$spec" --jobs "${JOBS:-2}" --profile "${PROFILE:-full}" ${ARGS:-})
done
echo "=== $(date -u +%H:%M:%S) done"
