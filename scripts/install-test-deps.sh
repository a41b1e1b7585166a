#!/usr/bin/env bash
# Installs the Debian packages the test suite needs, only those missing; `make test` and .ci/run
# both run it. Idempotent: with everything present it prints one line per check, touches
# nothing and takes well under a second (no apt-get update).
#
#   scripts/install-test-deps.sh          check, and install what is missing (root, or sudo)
#   scripts/install-test-deps.sh --check  check only: exit 1 naming what is missing
#   scripts/install-test-deps.sh --list   the checks it makes, one "kind name package" a line
#
# What it checks comes from tests/harness/programs.py, the one list the test harness also
# uses (require_program names the package to install): PROGRAMS ("program": "package") and
# FONTS ("fontconfig language": "package"), one entry a line, and NPM_PACKAGES ("name":
# "version"), installed with npm (itself one of PROGRAMS) at exactly that version under
# NPM_PREFIX in the repository; tests/test_install_deps.py keeps this script's reading of them
# equal to the Python dicts. On top of those, what the test command itself needs: make, python3
# and its venv module.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PROGRAMS_PY=tests/harness/programs.py

MODE=install
case "${1:-}" in
    "") ;;
    --check) MODE=check ;;
    --list) MODE=list ;;
    -h | --help)
        sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "usage: $0 [--check | --list]" >&2
        exit 2
        ;;
esac

# The entries of one dict of programs.py: `    "key": "value",` lines between `NAME = {` and `}`.
read_dict() {
    sed -n "/^$1 = {\$/,/^}\$/p" "$PROGRAMS_PY" |
        sed -n 's/^ *"\([^"]*\)": *"\([^"]*\)", *\(#.*\)\{0,1\}$/\1 \2/p'
}

CHECKS=()
add_checks() {
    local kind=$1 dict=$2 name package
    while read -r name package; do
        CHECKS+=("$kind $name $package")
    done < <(read_dict "$dict")
}
CHECKS+=("program make make" "program python3 python3" "module ensurepip python3-venv")
add_checks program PROGRAMS
add_checks font FONTS
add_checks npm NPM_PACKAGES
NPM_PREFIX=$(sed -n 's/^NPM_PREFIX = "\([^"]*\)"$/\1/p' "$PROGRAMS_PY")

if [[ $MODE == list ]]; then
    printf '%s\n' "${CHECKS[@]}"
    exit 0
fi

# Present: a program on PATH, in an sbin directory (nginx, iptables for ordinary users) or in
# Debian's versioned PostgreSQL directory (initdb, pg_ctl: /usr/lib/postgresql/<major>/bin), a
# Python module python3 can import, any font fontconfig has for the language.
present() {
    local kind=$1 name=$2
    case $kind in
        program) command -v "$name" >/dev/null 2>&1 || [[ -x /usr/sbin/$name || -x /sbin/$name ]] ||
            compgen -G "/usr/lib/postgresql/*/bin/$name" >/dev/null ;;
        module) command -v python3 >/dev/null 2>&1 && python3 -c "import $name" >/dev/null 2>&1 ;;
        font) command -v fc-list >/dev/null 2>&1 && [[ -n $(fc-list ":lang=$name" family 2>/dev/null) ]] ;;
        # npm: "name version"; that version's package.json under NPM_PREFIX.
        npm) grep -Eq "^  \"version\": \"$3\"," "$NPM_PREFIX/node_modules/$name/package.json" 2>/dev/null ;;
        *) return 1 ;;
    esac
}

missing=()
npm_missing=()
for check in "${CHECKS[@]}"; do
    read -r kind name package <<<"$check"
    if present "$kind" "$name" "$package"; then
        echo "  ok       $kind $name ($package)"
    elif [[ $kind == npm ]]; then
        echo "  MISSING  npm $name: npm package $name@$package under $NPM_PREFIX"
        npm_missing+=("$name@$package")
    else
        echo "  MISSING  $kind $name: Debian package $package"
        [[ " ${missing[*]} " == *" $package "* ]] || missing+=("$package")
    fi
done

# npm packages go into the repository's NPM_PREFIX: no root needed, nothing system-wide.
npm_install() {
    [[ ${#npm_missing[@]} -eq 0 ]] && return 0
    echo "installing with npm into $NPM_PREFIX: ${npm_missing[*]}"
    mkdir -p "$NPM_PREFIX"
    npm install --prefix "$NPM_PREFIX" --no-save --no-package-lock --no-audit --no-fund --ignore-scripts \
        "${npm_missing[@]}"
}

if [[ ${#missing[@]} -eq 0 && ${#npm_missing[@]} -eq 0 ]]; then
    echo "test dependencies: all present"
    exit 0
fi
if [[ $MODE == check ]]; then
    [[ ${#npm_missing[@]} -eq 0 ]] ||
        echo "test dependencies missing: npm install --prefix $NPM_PREFIX ${npm_missing[*]} (or run $0)"
    [[ ${#missing[@]} -eq 0 ]] || echo "test dependencies missing: apt-get install ${missing[*]} (or run $0 as root)"
    exit 1
fi
if [[ ${#missing[@]} -eq 0 ]]; then
    npm_install
    still=()
    for check in "${CHECKS[@]}"; do
        read -r kind name package <<<"$check"
        present "$kind" "$name" "$package" || still+=("$kind $name ($package)")
    done
    if [[ ${#still[@]} -gt 0 ]]; then
        echo "still missing after the install: ${still[*]}" >&2
        exit 1
    fi
    echo "test dependencies: installed ${npm_missing[*]}"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "no apt-get on this machine: install the Debian packages ${missing[*]} (or their equivalents)" >&2
    exit 1
fi
if [[ $(id -u) -eq 0 ]]; then
    as_root() { "$@"; }
elif command -v sudo >/dev/null 2>&1; then
    as_root() { sudo "$@"; }
else
    echo "installing ${missing[*]} needs root: run this as root (make test must run as root anyway)" >&2
    exit 1
fi

apt_install() {
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"
}

# apt-get update only when the package lists cannot do: a missing package they do not know,
# or lists older than a day (old versions leave the mirrors). An install that fails on lists
# that looked good gets one update and one more try.
needs_update=0
lists_fresh=$(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' -mmin -1440 2>/dev/null | head -n 1)
if [[ -z $lists_fresh ]]; then
    needs_update=1
    echo "package lists: none from the last day"
else
    for package in "${missing[@]}"; do
        candidate=$(apt-cache policy "$package" 2>/dev/null | sed -n 's/^ *Candidate: //p')
        if [[ -z $candidate || $candidate == "(none)" ]]; then
            needs_update=1
            echo "package lists: no $package in them"
            break
        fi
    done
fi

echo "installing: ${missing[*]}"
if [[ $needs_update -eq 1 ]]; then
    as_root apt-get update -q
    apt_install "${missing[@]}"
elif ! apt_install "${missing[@]}"; then
    echo "apt-get install failed on the current package lists: apt-get update, then once more"
    as_root apt-get update -q
    apt_install "${missing[@]}"
fi
npm_install

still=()
for check in "${CHECKS[@]}"; do
    read -r kind name package <<<"$check"
    present "$kind" "$name" "$package" || still+=("$kind $name ($package)")
done
if [[ ${#still[@]} -gt 0 ]]; then
    echo "still missing after the install: ${still[*]}" >&2
    exit 1
fi
echo "test dependencies: installed ${missing[*]} ${npm_missing[*]}"
