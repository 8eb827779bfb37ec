#!/usr/bin/env bash
# Installs everything hotspare and its tests need on a fresh Debian machine, idempotently:
# system tools with apt-get where missing, then a virtualenv in .venv with the project.
# Fast when everything is already there (a few `command -v` and one hash of the lock file).
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages and the command each one gives us (a package is installed only when its
# command is missing, so a second run costs nothing).
declare -A need=(
  [qemu-img]=qemu-utils
  [qemu-io]=qemu-utils
  [qemu-system-x86_64]=qemu-system-x86
  [qemu-storage-daemon]=qemu-system-common
  [nbdinfo]=libnbd-bin
  [fusermount3]=fuse3
  [fio]=fio
  [xxhsum]=xxhash
  [vhdiinfo]=libvhdi-utils
  [nbdkit]=nbdkit
  [chromium]=chromium  # the browser tests/test_ui.py drives with Playwright
  [faketime]=faketime  # the fault suite runs agents whose clocks are wrong
)
missing=()
for cmd in "${!need[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${need[$cmd]}")
done
/usr/bin/python3 -c 'import pyvhdi' 2>/dev/null || missing+=(python3-libvhdi)
# `hotspare serve` runs nbdkit's Python plugin (the point's chunk reader inside nbdkit).
nbdkit python --dump-plugin >/dev/null 2>&1 || missing+=(nbdkit-plugin-python)
if [ ${#missing[@]} -gt 0 ]; then
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  echo "setup: apt-get install ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  sudo_=""; [ "$(id -u)" -eq 0 ] || sudo_=sudo
  $sudo_ apt-get update -qq
  $sudo_ apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

py=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  "$py" -m venv .venv
fi
# The install is locked: constraints.txt holds the exact version of every package, so each
# machine gets the set that was tested together. The stamp records the hash of
# constraints.txt and pyproject.toml, so a change to either (a pull, an edit, a checkout)
# re-installs, and an unchanged pair costs nothing.
stamp=.venv/.hotspare-installed
want="$(cat constraints.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: pip install -c constraints.txt -e .[test]" >&2
  # pip's own chatter goes to a log, shown only if the install fails.
  if ! { .venv/bin/python -m pip install -q --upgrade pip \
         && .venv/bin/python -m pip install -q -c constraints.txt -e '.[test]' \
         && .venv/bin/python -m pip check; } > .venv/pip.log 2>&1; then
    tail -50 .venv/pip.log >&2
    echo "setup: pip install failed (full log: .venv/pip.log)" >&2
    exit 1
  fi
  echo "$want" > "$stamp"
fi
