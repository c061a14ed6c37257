#!/usr/bin/env bash
# Make the local base image the container tests build on: Debian minbase + python3, no registry.
#
#   DOCKER_HOST=... .ci/base-image.sh              # prints the image tag (default smash-base:bookworm-py311)
#
# Order of preference, cheapest first:
#   1. the image is already in the engine                      -> nothing to do
#   2. a saved copy sits in the cache folder                   -> `docker load` (seconds; same image ID every run)
#   3. otherwise debootstrap --variant=minbase + python3,
#      `docker import`, and `docker save` into the cache       (~1.5-2 min, network to the Debian mirror)
#
# The suite matches the base's Python to the host's (the wheelhouse is resolved on the host):
# bookworm ships python3.11, so this base fits a host on Python 3.11. Override with
# SMASH_BASE_SUITE / SMASH_BASE_TAG / SMASH_BASE_MIRROR for another release.
# Cache folder: $SMASH_CACHE_DIR, else ${XDG_CACHE_HOME:-~/.cache}/smash-build. Needs root.
set -euo pipefail

suite="${SMASH_BASE_SUITE:-bookworm}"
tag="${SMASH_BASE_TAG:-smash-base:${suite}-py311}"
mirror="${SMASH_BASE_MIRROR:-http://deb.debian.org/debian}"
cache="${SMASH_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/smash-build}"
saved="$cache/${tag//[:\/]/_}.docker.tar"

if docker image inspect "$tag" >/dev/null 2>&1; then
    echo "$tag"
    exit 0
fi

if [ -s "$saved" ]; then
    echo "base-image: loading $saved" >&2
    docker load -q -i "$saved" >&2
    echo "$tag"
    exit 0
fi

if ! command -v debootstrap >/dev/null; then
    echo "base-image: debootstrap is missing (apt-get install debootstrap)" >&2
    exit 1
fi

work="$(mktemp -d /tmp/smash-base.XXXXXX)"
trap 'rm -rf "$work"' EXIT
root="$work/rootfs"
start=$SECONDS
echo "base-image: debootstrap $suite (minbase + python3) from $mirror" >&2
# python3 only: no pip, no ensurepip wheels, no compilers, no CA bundle. Images install their
# Python packages from a hash-locked wheelhouse with a pip wheel they bring themselves.
debootstrap --variant=minbase --include=python3 "$suite" "$root" "$mirror" >"$work/debootstrap.log" 2>&1 || {
    tail -n 30 "$work/debootstrap.log" >&2
    exit 1
}
# Drop what only the bootstrap needed and what changes on every run (logs, apt lists, caches).
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
       "$root"/var/log/* "$root"/var/cache/ldconfig/aux-cache "$root"/debootstrap
find "$root" -name __pycache__ -type d -prune -exec rm -rf {} +
: >"$root/etc/machine-id"

# Deterministic tar: sorted names, numeric owners, fixed mtimes.
epoch="${SOURCE_DATE_EPOCH:-$(stat -c %Y "$root/var/lib/dpkg/status")}"
tar --sort=name --numeric-owners --mtime="@$epoch" --clamp-mtime --xattrs -C "$root" -cf "$work/rootfs.tar" . 2>/dev/null ||
tar --sort=name --numeric-owner --mtime="@$epoch" --clamp-mtime -C "$root" -cf "$work/rootfs.tar" .
docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    --message "debootstrap --variant=minbase --include=python3 $suite" \
    "$work/rootfs.tar" "$tag" >&2
mkdir -p "$cache"
docker save -o "$saved.tmp" "$tag" && mv "$saved.tmp" "$saved"
echo "base-image: built $tag in $((SECONDS - start)) s; saved to $saved" >&2
echo "$tag"
