# The CI matrix, sourced by tools/setup-env.sh, tools/test.sh, tools/lock.sh and .ci/run.
# A leg is one Python, one constraints file (the exact package set it is tested with), the extras installed
# and the top-level requirements tools/lock.sh resolves that file from.
# shellcheck shell=bash

LEGS=(axolotl-0.19 axolotl-0.21 newest)
# tools/test.sh and tools/demo.sh take the first of these whose Python this machine has (newest first).
PRIMARY_LEGS=(axolotl-0.21 axolotl-0.19)

declare -A LEG_PYTHON=([axolotl-0.19]=3.11 [axolotl-0.21]=3.12 [newest]=3.13)
declare -A LEG_CONSTRAINTS=([axolotl-0.19]=constraints.txt [axolotl-0.21]=constraints-axolotl-0.21.txt
                            [newest]=constraints-newest.txt)
declare -A LEG_EXTRAS=([axolotl-0.19]=all [axolotl-0.21]=all [newest]=deepspeed,qlora,plots,test)
# Axolotl 0.19 pins torch <= 2.13.0 and works with the CPU build; Axolotl 0.21 pins torch 2.14.1, of which only
# a CUDA build installs (it runs on CPU). `newest`: no Axolotl, everything else at its newest release.
declare -A LEG_REQUIREMENTS=([axolotl-0.19]="torch==2.13.0 axolotl==0.19.0 deepspeed==0.19.8"
                             [axolotl-0.21]="axolotl==0.21.0 deepspeed==0.19.8"
                             [newest]="trl transformers peft accelerate datasets deepspeed bitsandbytes")

check_leg() {
    [ -n "${LEG_PYTHON[$1]:-}" ] && return
    echo "unknown leg '$1': expected one of ${LEGS[*]}" >&2
    return 2
}

# find_python 3.12: the path of a Python 3.12, by name on PATH first (python3.12), then under pyenv, then
# python3 if it is that version. A name that exists but does not run as that version (a pyenv shim for a
# version not selected) does not count.
find_python() {
    local version=$1 candidate
    for candidate in "python$version" "$(pyenv root 2>/dev/null || echo ~/.pyenv)"/versions/"$version".*/bin/"python$version" python3; do
        if "$candidate" -c 'import sys; assert "%d.%d" % sys.version_info[:2] == sys.argv[1]' "$version" 2>/dev/null; then
            command -v "$candidate"
            return
        fi
    done
    echo "no Python $version: expected python$version on PATH or under pyenv (versions/$version.*); found neither" >&2
    return 1
}

# The newest primary leg whose Python this machine has.
primary_leg() {
    local leg
    for leg in "${PRIMARY_LEGS[@]}"; do
        find_python "${LEG_PYTHON[$leg]}" >/dev/null 2>&1 && { echo "$leg"; return; }
    done
    local wanted=()
    for leg in "${PRIMARY_LEGS[@]}"; do wanted+=("Python ${LEG_PYTHON[$leg]} (leg $leg)"); done
    echo "no Python to test with: expected $(IFS=,; echo "${wanted[*]}" | sed 's/,/ or /g'); found none" >&2
    return 1
}
