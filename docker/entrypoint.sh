#!/bin/sh
# Entry point of the Trajectome image: make sure the caches are writable, then run the app.
#
# The container may run under any UID (`docker run --user`, or Apptainer, which runs as the
# calling user with the caller's HOME or none at all) and on a read-only root filesystem.
# Nipype, matplotlib, Deno (the BIDS validator) and friends write small caches under HOME or
# XDG_CACHE_HOME; point each at a directory this user can write instead of failing or
# scattering warnings. Directories that are already writable are left alone.
set -eu

writable() {
    [ -n "$1" ] && mkdir -p "$1" 2>/dev/null && [ -w "$1" ]
}

if ! writable "${HOME:-}"; then
    HOME=$(mktemp -d "${TMPDIR:-/tmp}/trajectome-home.XXXXXX")
fi
export HOME

if ! writable "${XDG_CACHE_HOME:-}"; then
    XDG_CACHE_HOME=$HOME/.cache
    mkdir -p "$XDG_CACHE_HOME"
fi
export XDG_CACHE_HOME

if ! writable "${MPLCONFIGDIR:-}"; then
    MPLCONFIGDIR=$XDG_CACHE_HOME/matplotlib
    mkdir -p "$MPLCONFIGDIR"
fi
export MPLCONFIGDIR

if ! writable "${DENO_DIR:-}"; then
    DENO_DIR=$XDG_CACHE_HOME/deno
    mkdir -p "$DENO_DIR"
fi
export DENO_DIR

# Nipype reads (and may write) nipype.cfg/nipype.json here; it defaults to ~/.nipype.
if ! writable "${NIPYPE_CONFIG_DIR:-}"; then
    NIPYPE_CONFIG_DIR=$HOME/.nipype
    mkdir -p "$NIPYPE_CONFIG_DIR"
fi
export NIPYPE_CONFIG_DIR

exec trajectome "$@"
