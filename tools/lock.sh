#!/usr/bin/env bash
# bash tools/lock.sh [LEG...]: regenerate the constraints files (default: every leg of tools/legs.sh).
# For each leg: a throwaway venv with the leg's Python, grasp-trl[extras] plus the leg's top-level
# requirements resolved by pip without constraints, frozen into the leg's constraints file.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/legs.sh
[ $# -gt 0 ] || set -- "${LEGS[@]}"
for leg in "$@"; do check_leg "$leg"; done
for leg in "$@"; do
    python=$(find_python "${LEG_PYTHON[$leg]}")
    venv=$(mktemp -d)/venv
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    read -ra requirements <<< "${LEG_REQUIREMENTS[$leg]}"
    # torch first, alone (see tools/setup-env.sh)
    "$venv/bin/python" -m pip install --quiet $(printf '%s\n' "${requirements[@]}" | grep '^torch' || echo torch)
    "$venv/bin/python" -m pip install --quiet -e ".[${LEG_EXTRAS[$leg]}]" "${requirements[@]}"
    {
        echo "# CI leg $leg: the exact package set tested (Python ${LEG_PYTHON[$leg]}; ${LEG_REQUIREMENTS[$leg]})."
        echo "# Regenerate: bash tools/lock.sh $leg (tools/legs.sh says what it resolves)."
        # the local CPU build's version suffix (+cpu) is dropped so the file also matches the plain release
        "$venv/bin/python" -m pip freeze --exclude grasp-trl | sed 's/+cpu$//'
    } > "${LEG_CONSTRAINTS[$leg]}"
    rm -rf "$(dirname "$venv")"
    echo "lock: ${LEG_CONSTRAINTS[$leg]} ($(grep -vc '^#' "${LEG_CONSTRAINTS[$leg]}") packages)"
done
