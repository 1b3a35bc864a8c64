#!/usr/bin/env bash
# Set up a fresh Debian machine and run the whole test suite:  bash scripts/test.sh [PYTEST ARGS]
#
#   1. Debian packages the tests need (real one-node Slurm, munge, Chromium for browser tests),
#      installed only when missing.
#   2. The project with its `test` extra. torch is pinned to the CPU build 2.13.0 so pip takes
#      that wheel instead of pulling a multi-GB CUDA build.
#   3. pytest; its exit status is this script's exit status.
#
# Environment: PYTHON (interpreter to use; default python, else python3),
#              PDBATCH_SKIP_INSTALL=1 (skip steps 1-2 on an already prepared machine).
# The Slurm tests start slurmctld/slurmd/munged themselves and need root.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
APT_PACKAGES=(slurm-wlm munge chromium)

install_debian_packages() {
    if ! command -v dpkg-query >/dev/null; then
        echo "test.sh: no dpkg-query (not Debian?); install ${APT_PACKAGES[*]} yourself" >&2
        return 0
    fi
    local missing=() pkg
    for pkg in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$pkg")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    local sudo=()
    [ "$(id -u)" -ne 0 ] && sudo=(sudo)
    echo "test.sh: installing Debian packages: ${missing[*]}"
    "${sudo[@]}" apt-get update -q
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${missing[@]}"
}

if [ "${PDBATCH_SKIP_INSTALL:-0}" != 1 ]; then
    install_debian_packages
    "$PYTHON" -m pip install -q --disable-pip-version-check torch==2.13.0 -e '.[test]'
fi

# munged, slurmctld and slurmd live in /usr/sbin, which a non-login PATH may lack.
export PATH="$PATH:/usr/sbin:/sbin"

status=0
"$PYTHON" -m pytest -q -rfEs "$@" || status=$?
exit "$status"
