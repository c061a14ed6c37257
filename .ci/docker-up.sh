#!/usr/bin/env bash
# Start a private Docker engine for the test suite and print the environment that points at it.
#
#   eval "$(.ci/docker-up.sh)"      # exports DOCKER_HOST and SMASH_DOCKER_DIR
#   ...                             # docker / pytest -m docker
#   .ci/docker-down.sh              # stops that engine by its PID and removes its data
#
# Why by hand: CI machines have no systemd and no registry. The engine gets its own data root,
# socket and PID file under one temp folder, so it never touches (or is touched by) any other
# engine on the machine. --iptables=false --bridge=none: the machine's kernel/netns forbids the
# default bridge; containers use --network host (builds too).
# Needs root. Installs docker.io + debootstrap with apt when missing (Debian/Ubuntu).
set -euo pipefail

if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
    echo "docker-up: installing docker.io and debootstrap" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends docker.io debootstrap >&2
fi

dir="${SMASH_DOCKER_DIR:-}"
if [ -z "$dir" ]; then
    dir="$(mktemp -d /tmp/smash-docker.XXXXXX)"
fi
mkdir -p "$dir"
sock="$dir/docker.sock"

if [ -f "$dir/dockerd.pid" ] && kill -0 "$(cat "$dir/dockerd.pid")" 2>/dev/null; then
    echo "docker-up: engine already running (pid $(cat "$dir/dockerd.pid"))" >&2
else
    # A short exec-root: containerd's socket paths must stay under the 108-byte unix socket limit.
    nohup dockerd \
        --iptables=false --ip-masq=false --bridge=none \
        --data-root "$dir/data" --exec-root "$dir/exec" \
        --pidfile "$dir/dockerd.pid" --host "unix://$sock" \
        --containerd-namespace smash-ci --containerd-plugins-namespace smash-ci-plugins \
        >"$dir/dockerd.log" 2>&1 &
    echo $! >"$dir/dockerd.launcher.pid"
fi

for _ in $(seq 1 120); do
    if DOCKER_HOST="unix://$sock" docker version >/dev/null 2>&1; then
        echo "export SMASH_DOCKER_DIR=$dir"
        echo "export DOCKER_HOST=unix://$sock"
        exit 0
    fi
    if ! kill -0 "$(cat "$dir/dockerd.launcher.pid")" 2>/dev/null; then
        echo "docker-up: dockerd exited; its log:" >&2
        tail -n 30 "$dir/dockerd.log" >&2
        exit 1
    fi
    sleep 0.5
done
echo "docker-up: dockerd did not answer within 60 s; log: $dir/dockerd.log" >&2
tail -n 30 "$dir/dockerd.log" >&2
exit 1
