#!/usr/bin/env bash
# Do the README's set-up commands work on a fresh machine?
#
#   bash scripts/check_fresh_install.sh [--unlocked] [--tests "PYTEST ARGS"] [--keep] [REPO_DIR]
#
#   1. Clones REPO_DIR's HEAD (default: this repository) into a temporary folder. Only what is
#      committed is checked: uncommitted changes are not in the clone (a warning says so).
#   2. Makes a fresh venv (from $PYTHON, default python3: Python 3.11) and activates it, so `pip`
#      and `pdbatch` in the commands are the venv's.
#   3. Runs the two commands of the README's Set-up block exactly as written there (read from
#      the clone's README.md, so they cannot drift from what a user copies), each timed.
#   4. Says what command 1's plain `pip install` resolved that requirements/base.lock pins
#      otherwise (information: command 1 installs from pyproject.toml's ranges, not a lock).
#
# Modes: locked (default): command 2 installs requirements/test.lock, as CI does.
#        --unlocked: first resolves the test set against the newest releases pyproject.toml
#          allows (scripts/lock.sh --out, no committed lock), command 2 installs that instead
#          (PDBATCH_TEST_LOCK), and the script reports every pin that has drifted (package,
#          locked version, newest) and each direct requirement whose newest release
#          pyproject.toml's range keeps out. Drift is reported; only a failing command fails.
# --tests "ARGS": the pytest selection command 2 runs, handed over in PYTEST_ADDOPTS so that the
#          command itself stays as written (e.g. --tests tests/test_install.py); default all.
# --keep:  leave the temporary folder (its path is printed) instead of removing it.
# Exit status: 0 when both commands passed, 1 when one failed, 2 for a usage error or a README
# whose Set-up block no longer holds two commands.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mode=locked
tests=""
keep=0
repo=""
while [ $# -gt 0 ]; do
    case "$1" in
        --unlocked) mode=unlocked; shift ;;
        --tests) tests="$2"; shift 2 ;;
        --keep) keep=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) echo "check_fresh_install.sh: unknown option $1" >&2; exit 2 ;;
        *) repo="$1"; shift ;;
    esac
done
repo="$(cd "${repo:-$here}" && git rev-parse --show-toplevel)"
PYTHON="${PYTHON:-python3}"

tmp="$(mktemp -d -t pdbatch-fresh.XXXXXX)"
cleanup() {
    if [ "$keep" = 1 ]; then
        echo "check: kept $tmp"
    else
        rm -rf "$tmp"
    fi
}
trap cleanup EXIT
say() { echo "check: $*"; }

commit="$(git -C "$repo" rev-parse HEAD)"
[ -z "$(git -C "$repo" status --porcelain --untracked-files=no)" ] \
    || say "warning: $repo has uncommitted changes; they are not in the clone"
git clone --quiet --no-checkout "$repo" "$tmp/pdbatch"
git -C "$tmp/pdbatch" checkout --quiet --detach "$commit"
clone="$tmp/pdbatch"
say "$mode mode; fresh clone of $repo at $(git -C "$clone" log -1 --format='%h %s' | cut -c1-90)"

# The README's Set-up block: its non-comment lines are the commands.
mapfile -t commands < <("$PYTHON" - "$clone/README.md" <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
section = re.search(r"^## Set-up.*?(?=^## )", text, re.S | re.M)
block = section and re.search(r"^```bash\n(.*?)^```", section[0], re.S | re.M)
for line in (block[1].splitlines() if block else []):
    if line.strip() and not line.lstrip().startswith("#"):
        print(line.strip())
EOF
)
if [ "${#commands[@]}" -ne 2 ]; then
    echo "check_fresh_install.sh: README.md's Set-up block has ${#commands[@]} commands, not 2:" >&2
    printf '  %s\n' "${commands[@]}" >&2
    exit 2
fi

"$PYTHON" -m venv "$tmp/venv"
export VIRTUAL_ENV="$tmp/venv"
export PATH="$tmp/venv/bin:$PATH"
unset PYTHONHOME PDBATCH_TEST_LOCK PDBATCH_TEST_VENV PDBATCH_SKIP_INSTALL
[ -n "$tests" ] && export PYTEST_ADDOPTS="$tests"

if [ "$mode" = unlocked ]; then
    say "resolving the test set against the newest releases (scripts/lock.sh --out)"
    t0=$SECONDS
    (cd "$clone" && bash scripts/lock.sh --out "$tmp/locks" test) >"$tmp/lock.log" 2>&1 \
        || { cat "$tmp/lock.log" >&2; say "FAILED: the test set does not resolve from the newest releases"; exit 1; }
    say "resolved in $((SECONDS - t0)) s"
    export PDBATCH_TEST_LOCK="$tmp/locks/test.lock"
fi

status=0
times=()
for i in 0 1; do
    cmd="${commands[$i]}"
    say "command $((i + 1)): $cmd"
    t0=$SECONDS
    rc=0
    (cd "$clone" && bash -o pipefail -c "$cmd") || rc=$?
    times+=("command $((i + 1)): $((SECONDS - t0)) s, exit $rc")
    say "${times[-1]}"
    if [ "$i" = 0 ]; then
        # What plain pip made of pyproject.toml's ranges, against the tested pins.
        "$tmp/venv/bin/python" -m pip freeze --all --exclude-editable >"$tmp/command1.txt" 2>/dev/null || true
        "$tmp/venv/bin/python" "$clone/scripts/lock_drift.py" --label "command 1 (plain pip)" \
            "$clone/requirements/base.lock" "$tmp/command1.txt" || true
    fi
    if [ "$rc" -ne 0 ]; then
        status=1
        break
    fi
done

if [ "$mode" = unlocked ]; then
    say "drift of requirements/test.lock against the newest releases:"
    "$tmp/venv/bin/python" "$clone/scripts/lock_drift.py" --held-back "$clone/pyproject.toml" \
        "$clone/requirements/test.lock" "$tmp/locks/test.lock" || true
fi

say "summary ($mode, $(git -C "$clone" rev-parse --short HEAD)):"
printf 'check:   %s\n' "${times[@]}"
[ "$status" = 0 ] && say "PASSED" || say "FAILED"
exit "$status"
