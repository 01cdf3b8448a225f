#!/bin/sh
# Mirrors complete model versions from an object store into the pod's model repository.
#
#   MODEL_SOURCE     rclone path of the remote repository root, e.g. `s3:my-bucket/models`
#                    (laid out like model_repo/: <model>/<version>/manifest.json, ...)
#   MODEL_REPO       local repository root the server reads (default /models)
#   SYNC_INTERVAL_S  seconds between rounds (default 30)
#   KEEP_VERSIONS    how many of the newest remote versions are fetched and kept per model (default 3);
#                    a version deleted from the source is removed here too
#   READY_FILE       touched after the first round, for the sidecar's startup probe
#   SYNC_ONCE=1      one round, then exit (tests)
#
# Each new remote version is copied into `<model>/.staging-sync-<version>/` (the server never reads
# `.staging-*`), its manifest's SHA-256 list is checked, and only then is the folder renamed to
# `<model>/<version>`: one rename(2) on one file system, so the server sees no version or a whole
# one. A version that is incomplete upstream (no manifest yet, a file missing or different) stays in
# staging; the next round copies only what differs and tries again. Versions are immutable: a
# published one is never copied again.
set -u

MODEL_REPO=${MODEL_REPO:-/models}
SYNC_INTERVAL_S=${SYNC_INTERVAL_S:-30}
KEEP_VERSIONS=${KEEP_VERSIONS:-3}
READY_FILE=${READY_FILE:-/tmp/first-sync-done}

log() { echo "model-sync: $*"; }

# `hex  name` lines from the manifest's "sha256" object, for `sha256sum -c`.
checksum_list() {
    tr -d '\n\r' < "$1" \
        | sed -n 's/.*"sha256"[[:space:]]*:[[:space:]]*{\([^}]*\)}.*/\1/p' \
        | tr ',' '\n' \
        | sed -n 's/^[[:space:]]*"\([^"/]*\)"[[:space:]]*:[[:space:]]*"\([0-9a-f]\{64\}\)"[[:space:]]*$/\2  \1/p'
}

verify() { # staging folder
    [ -f "$1/manifest.json" ] || { log "$1: no manifest.json yet"; return 1; }
    list=$(checksum_list "$1/manifest.json")
    [ -n "$list" ] || { log "$1: manifest.json lists no sha256"; return 1; }
    (cd "$1" && printf '%s\n' "$list" | sha256sum -c - >/dev/null 2>&1) \
        || { log "$1: files missing or different from the manifest"; return 1; }
}

publish() { # model version
    final="$MODEL_REPO/$1/$2"
    [ -e "$final" ] && return 0
    stage="$MODEL_REPO/$1/.staging-sync-$2"
    mkdir -p "$stage" || return 1
    rclone sync --checksum "$MODEL_SOURCE/$1/$2" "$stage" || { log "$1/$2: copy failed"; return 1; }
    verify "$stage" || return 1
    sync
    mv "$stage" "$final" && log "published $1/$2"
}

remove() { # model version why
    # Out of sight in one rename, then deleted: the server never sees a half-deleted version.
    trash="$MODEL_REPO/$1/.staging-trash-$2"
    mv "$MODEL_REPO/$1/$2" "$trash" && rm -rf "$trash" && log "removed $1/$2 ($3)"
}

local_versions() { # model
    ls "$MODEL_REPO/$1" 2>/dev/null | grep -E '^[1-9][0-9]{0,17}$' | sort -rn
}

round() {
    models=$(rclone lsf --dirs-only "$MODEL_SOURCE") || { log "cannot list $MODEL_SOURCE"; return 1; }
    for m in $models; do
        model=${m%/}
        echo "$model" | grep -Eq '^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$' || continue
        listing=$(rclone lsf --dirs-only "$MODEL_SOURCE/$model") || { log "cannot list $model"; continue; }
        remote=$(printf '%s\n' "$listing" | sed 's#/$##' | grep -E '^[1-9][0-9]{0,17}$' | sort -rn)
        [ -n "$remote" ] || continue  # never empty a model because its listing came back empty
        # Only the newest KEEP_VERSIONS remote versions are fetched, so nothing pruned below comes back.
        window=$(printf '%s\n' "$remote" | head -n "$KEEP_VERSIONS")
        for version in $window; do
            publish "$model" "$version"
        done
        for stage in "$MODEL_REPO/$model"/.staging-sync-*; do
            [ -d "$stage" ] || continue
            printf '%s\n' "$window" | grep -qx "${stage##*/.staging-sync-}" \
                || { rm -rf "$stage" && log "dropped unfinished ${stage##*/} (no longer among the newest)"; }
        done
        # A version withdrawn from the bucket leaves every pod (the server falls back to the newest left).
        for version in $(local_versions "$model"); do
            printf '%s\n' "$remote" | grep -qx "$version" || remove "$model" "$version" "gone from the source"
        done
        for version in $(local_versions "$model" | awk -v keep="$KEEP_VERSIONS" 'NR > keep'); do
            remove "$model" "$version" "older than the newest $KEEP_VERSIONS"
        done
    done
}

: "${MODEL_SOURCE:?set MODEL_SOURCE to the remote repository root, e.g. s3:bucket/models}"
mkdir -p "$MODEL_REPO"
while :; do
    round
    touch "$READY_FILE"
    [ "${SYNC_ONCE:-0}" = 1 ] && exit 0
    sleep "$SYNC_INTERVAL_S"
done
