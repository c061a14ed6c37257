#!/usr/bin/env bash
# Stop the engine .ci/docker-up.sh started (by its PID only) and remove its data root.
#
#   .ci/docker-down.sh [SMASH_DOCKER_DIR]     # default: $SMASH_DOCKER_DIR
#
# Containers still running are killed by the engine on shutdown. The base image survives in the
# cache folder (.ci/base-image.sh saved it there), not in the data root.
set -uo pipefail

dir="${1:-${SMASH_DOCKER_DIR:-}}"
if [ -z "$dir" ] || [ ! -d "$dir" ]; then
    echo "docker-down: no engine folder given (argument or SMASH_DOCKER_DIR)" >&2
    exit 0
fi

pid=""
[ -f "$dir/dockerd.pid" ] && pid="$(cat "$dir/dockerd.pid")"
[ -z "$pid" ] && [ -f "$dir/dockerd.launcher.pid" ] && pid="$(cat "$dir/dockerd.launcher.pid")"
if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    # dockerd stops its containers (10 s grace each) and its managed containerd before exiting.
    for _ in $(seq 1 60); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.5
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "docker-down: dockerd $pid ignored SIGTERM for 30 s; sending SIGKILL" >&2
        kill -KILL "$pid" 2>/dev/null
        sleep 1
    fi
fi

# overlay mounts left behind by a killed engine would make rm fail.
if command -v findmnt >/dev/null; then
    findmnt -rn -o TARGET | grep -F "$dir/" | sort -r | while read -r m; do umount -l "$m" 2>/dev/null; done
fi
rm -rf "$dir"
echo "docker-down: stopped${pid:+ dockerd $pid} and removed $dir" >&2
