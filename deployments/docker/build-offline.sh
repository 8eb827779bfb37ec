#!/bin/sh
# Build hotspare's QEMU runner image without a registry (CI, air-gapped hosts):
# debootstrap a minimal Debian bookworm with QEMU into a temporary directory and
# `docker import` it. Same content as the Dockerfile beside this script.
#
#   deployments/docker/build-offline.sh [IMAGE:TAG] [DOCKER_HOST]
#
# IMAGE:TAG defaults to hotspare/qemu-runner:bookworm; DOCKER_HOST (for example
# unix:///tmp/d/docker.sock) defaults to the environment's. Does nothing when the image
# exists already. Needs root (debootstrap), the docker client and Debian's package
# mirror (DEBIAN_MIRROR, default http://deb.debian.org/debian); installs debootstrap with
# apt-get when it is missing. Leaves nothing behind but the image.
set -eu

IMAGE="${1:-hotspare/qemu-runner:bookworm}"
if [ -n "${2:-}" ]; then
    DOCKER_HOST="$2"
    export DOCKER_HOST
fi
SUITE=bookworm
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
me="build-offline.sh"

die() { echo "$me: $*" >&2; exit 1; }

command -v docker >/dev/null 2>&1 || die "the docker client is missing (Debian package docker.io)"
docker version >/dev/null 2>&1 || die "no docker daemon answers at ${DOCKER_HOST:-the default socket}"
if docker image inspect "$IMAGE" >/dev/null 2>&1; then
    echo "$me: $IMAGE exists already; nothing to do"
    exit 0
fi
[ "$(id -u)" -eq 0 ] || die "debootstrap needs root"
if ! command -v debootstrap >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 || die "debootstrap is missing and there is no apt-get to install it"
    echo "$me: installing debootstrap"
    # An old or empty package list may not have it: update once, then retry.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null 2>&1 \
        || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; } \
        || die "apt-get could not install debootstrap"
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/hotspare-runner.XXXXXX")"
ROOT="$WORK/rootfs"
cleanup() {
    # debootstrap mounts proc and sys in the target; a killed run leaves them mounted,
    # and rm must never walk into them.
    for m in $(awk -v r="$ROOT" 'index($2, r) == 1 {print $2}' /proc/mounts | sort -r); do
        umount -l "$m" 2>/dev/null || true
    done
    rm -rf --one-file-system "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start=$(date +%s)
echo "$me: debootstrap $SUITE (minbase + QEMU) from $MIRROR"
# No recommends (debootstrap installs Depends only), so qemu-system-gui, ovmf and
# qemu-block-extra stay out, as in the Dockerfile.
if ! debootstrap --variant=minbase --include=qemu-system-x86,qemu-utils "$SUITE" "$ROOT" "$MIRROR" \
        >"$WORK/debootstrap.log" 2>&1; then
    tail -n 30 "$WORK/debootstrap.log" >&2
    [ -f "$ROOT/debootstrap/debootstrap.log" ] && tail -n 30 "$ROOT/debootstrap/debootstrap.log" >&2
    die "debootstrap failed (log tail above)"
fi
bootstrapped=$(date +%s)
# The downloaded .debs and package lists are not needed to run QEMU: about 60 MB less.
rm -rf "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/lib/apt/lists/*

echo "$me: importing as $IMAGE"
tar --numeric-owner -C "$ROOT" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'LABEL org.hotspare.role=qemu-runner' \
    --change 'CMD ["qemu-system-x86_64", "--version"]' \
    --message "hotspare QEMU runner: debootstrap $SUITE minbase + qemu-system-x86 qemu-utils" \
    - "$IMAGE" >/dev/null
now=$(date +%s)
echo "$me: built $IMAGE in $(( now - start )) s (debootstrap $(( bootstrapped - start )) s, import $(( now - bootstrapped )) s)"
