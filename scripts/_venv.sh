# shellcheck shell=bash
# Sourced by scripts/run-tests and scripts/run-router: the repository's virtualenv and install.
#
#   ensure_venv EXTRAS   create .venv with python3 if missing, then `pip install -e .[EXTRAS]`
#                        unless pyproject.toml is unchanged since the last install that had
#                        (at least) those extras. The stamp .venv/.deid-router-install holds
#                        "<sha256 of pyproject.toml> <extras,comma,separated>".
#   as_root CMD...       run CMD as root: directly, or with `sudo -n` when available.
#   native_tool NAME     true when a native (non-Python-script) NAME is installed; pynetdicom
#                        puts Python scripts called storescu/storescp into .venv/bin.

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO_ROOT/.venv"
STAMP="$VENV/.deid-router-install"

die() {
    echo "error: $*" >&2
    exit 1
}

as_root() {
    if [ "$(id -u)" = 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n "$@" || die "'$*' needs root; run it as root or allow passwordless sudo"
    else
        die "'$*' needs root and sudo is not installed; run it as root"
    fi
}

native_tool() {
    local name="$1" dir path
    local IFS=:
    for dir in $PATH /usr/bin /usr/sbin /usr/local/bin /usr/local/sbin; do
        path="$dir/$name"
        if [ -f "$path" ] && [ -x "$path" ]; then
            # skip Python console scripts (pynetdicom's storescu/storescp)
            if head -c 200 "$path" 2>/dev/null | head -n 1 | grep -q '^#!.*python'; then
                continue
            fi
            return 0
        fi
    done
    return 1
}

_with_lock() {
    # Serialise venv creation and installs between concurrent runs (run-tests and run-router).
    if command -v flock >/dev/null 2>&1; then
        local lock
        lock="${TMPDIR:-/tmp}/deid-router-venv-$(printf '%s' "$REPO_ROOT" | sha256sum | cut -c1-16).lock"
        (
            flock -w 900 9 || die "timed out waiting for $lock"
            "$@"
        ) 9>"$lock"
    else
        "$@"
    fi
}

_create_venv() {
    if [ -x "$VENV/bin/python" ]; then
        return 0
    fi
    command -v python3 >/dev/null 2>&1 || die "python3 not found; install Python 3.11 (apt-get install -y python3 python3-venv)"
    python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
        || die "Python >= 3.11 is required, found $(python3 --version 2>&1)"
    if ! python3 -c 'import ensurepip' >/dev/null 2>&1; then
        echo "run: installing python3-venv (needed to create .venv)" >&2
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
    fi
    echo "run: creating virtualenv $VENV" >&2
    python3 -m venv "$VENV" || die "could not create $VENV"
}

_install() {
    local extras="$1" want have_sha have_extras extra all
    want="$(sha256sum "$REPO_ROOT/pyproject.toml" | cut -d' ' -f1)"
    have_sha=""
    have_extras=""
    if [ -f "$STAMP" ]; then
        read -r have_sha have_extras <"$STAMP" || true
    fi
    if [ "$have_sha" = "$want" ] && "$VENV/bin/python" -c 'import deid_router' >/dev/null 2>&1; then
        local missing=0
        for extra in ${extras//,/ }; do
            case ",$have_extras," in
                *",$extra,"*) ;;
                *) missing=1 ;;
            esac
        done
        [ "$missing" = 0 ] && return 0
    fi
    # Install the union of what was there and what is asked for, so run-router after run-tests
    # does not trigger a second install next time run-tests runs.
    all="$(printf '%s\n' ${extras//,/ } ${have_extras//,/ } | sort -u | paste -sd, -)"
    echo "run: installing deid-router into $VENV (.[${all}])" >&2
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$REPO_ROOT[${all}]" \
        || die "pip install failed (see above); check network access to PyPI"
    printf '%s %s\n' "$want" "$all" >"$STAMP"
}

_ensure_venv_locked() {
    _create_venv
    _install "$1"
}

ensure_venv() {
    _with_lock _ensure_venv_locked "${1:-}"
}
