#!/bin/sh
# Run a command on diffship's code as it was at COMMIT, from a worktree of it under .pinned/ (made once).
#
#     sh benchmarks/pinned.sh COMMIT COMMAND [ARGS...]
#
# Every cache key holds a fingerprint of diffship's whole source (store/versions.source_fingerprint), so a full-size
# build that takes hours resumes from its cache only on the code that started it; pinned, the main line can move on
# meanwhile (`make bench-sd35m PIN=<commit>` uses this). The command runs in the worktree with it first on PYTHONPATH,
# so the repository's own environment (.venv, installed editable) imports the pinned package.
set -eu
commit=$1
shift
root=$(git rev-parse --show-toplevel)
dir="$root/.pinned/$(git rev-parse --short "$commit")"
if [ ! -d "$dir" ]; then
    git worktree add --detach "$dir" "$commit"
fi
cd "$dir"
PYTHONPATH="$dir${PYTHONPATH:+:$PYTHONPATH}" exec "$@"
