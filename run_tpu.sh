#!/usr/bin/env bash
# Train llada-jax on a Cloud TPU slice: create (or reuse) a TPU VM or queued resource, put the
# committed project on every worker, install it, run `llada-jax train` on all workers, stream the
# logs, and relaunch after preemption (the trainer resumes from the latest checkpoint in the
# workdir, so a relaunch is the same command). `run_tpu.sh --help` lists the flags.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly REPO_ROOT
readonly REMOTE_DIR=llada-jax            # relative to the TPU user's home (ssh starts there)
readonly REMOTE_TARBALL=llada-jax.tar.gz
readonly SUPPORTED="v4-N, v5p-N (N TensorCores, a multiple of 8), v5litepod-N, v6e-N (N chips:\
 1, 4, 8, 16, 32, 64, 128 or 256)"

usage() {
    cat <<EOF
Usage: run_tpu.sh --project P --zone Z --accelerator TYPE --workdir gs://BUCKET/DIR [options]
                  [--config.key=value ...] [-- extra train args]

Creates (or reuses) a Cloud TPU VM or queued resource, installs the committed HEAD of this
repository (or --repo URL) on all workers, runs
  llada-jax train --config CONFIG --workdir WORKDIR [--config.key=value ...]
on all workers, streams the output to the terminal and a local log file, and relaunches after a
preemption (the trainer resumes from the latest checkpoint in WORKDIR).

Required (flag or environment variable):
  --project P            LLADA_PROJECT         Google Cloud project
  --zone Z               LLADA_ZONE            zone, e.g. us-west4-a (v5e), us-east5-a (v5p)
  --accelerator TYPE     LLADA_ACCELERATOR     e.g. v5litepod-64, v5p-32, v4-32, v6e-16; v4/v5p
                                               count TensorCores, v5litepod/v6e chips (optional
                                               with --reuse unless it must recreate)
  --workdir gs://...     LLADA_WORKDIR         checkpoints and metrics, shared by all workers
Options:
  --runtime-version V    LLADA_RUNTIME_VERSION default per family: v4 tpu-ubuntu2204-base,
                                               v5p v2-alpha-tpuv5, v5litepod v2-alpha-tpuv5-lite,
                                               v6e v2-alpha-tpuv6e
  --tpu-name NAME        LLADA_TPU_NAME        default llada-jax-TYPE
  --config SPEC          LLADA_CONFIG          default configs/llada_8b.py (FILE[:VARIANT], or a
                                               shipped name: tiny, llada_8b:v5e_64, ...)
  --config.KEY=VALUE     config overrides, passed to the trainer unchanged (repeatable)
  --env KEY=VALUE        extra environment for the trainer on every worker (repeatable),
                         e.g. --env LIBTPU_INIT_ARGS=--xla_tpu_scoped_vmem_limit_kib=98304
  --repo URL [--ref R]   git clone URL at R (default: the remote's HEAD) on the workers instead
                         of copying a git archive of this checkout's HEAD
  --python EXE           interpreter on the workers (default python3.11, installed by apt
                         when missing; pyproject.toml requires 3.11)
  --spot                 spot capacity (preemptible; run_tpu.sh recreates and relaunches)
  --queued               create through a queued resource (waits for capacity)
  --reuse                use the existing TPU VM / queued resource named --tpu-name
  --max-restarts N       relaunches after preemption or lost ssh before giving up (default 5)
  --poll-seconds S       state polling interval and preemption grace period (default 30)
  --log-file PATH        default runs/run_tpu/NAME.log in this repository (appended)
  --teardown             delete the TPU VM (or queued resource with its node) and exit
  --teardown-on-exit     delete it when this script exits, whatever the outcome
  --dry-run              print every command (lines starting with "+ ") instead of running it
  -h, --help             this help
EOF
}

die() {
    echo "run_tpu.sh: error: $*" >&2
    exit 2
}

log() {
    local line
    line="[run_tpu $(date +%H:%M:%S)] $*"
    echo "$line" >&2
    if (( ! DRY_RUN )); then echo "$line" >>"$LOG_FILE"; fi
}

# ---------------------------------------------------------------------------------------------
# Arguments

parse_args() {
    PROJECT="${LLADA_PROJECT:-}"
    ZONE="${LLADA_ZONE:-}"
    ACCELERATOR="${LLADA_ACCELERATOR:-}"
    RUNTIME_VERSION="${LLADA_RUNTIME_VERSION:-}"
    TPU_NAME="${LLADA_TPU_NAME:-}"
    WORKDIR="${LLADA_WORKDIR:-}"
    CONFIG="${LLADA_CONFIG:-configs/llada_8b.py}"
    REPO_URL="" REPO_REF=HEAD PYTHON=python3.11 LOG_FILE=""
    SPOT=0 QUEUED=0 REUSE=0 TEARDOWN=0 TEARDOWN_ON_EXIT=0 DRY_RUN=0
    MAX_RESTARTS=5 POLL_SECONDS=30
    OVERRIDES=() TRAIN_ENV=()
    while (( $# )); do
        case "$1" in
            -h|--help) usage; exit 0 ;;
            --project|--zone|--accelerator|--runtime-version|--tpu-name|--workdir|--config|--env|\
            --repo|--ref|--python|--max-restarts|--poll-seconds|--log-file)
                (( $# >= 2 )) || die "$1 needs a value (see --help)"
                set_option "$1" "$2"
                shift 2 ;;
            --project=*|--zone=*|--accelerator=*|--runtime-version=*|--tpu-name=*|--workdir=*|\
            --config=*|--env=*|--repo=*|--ref=*|--python=*|--max-restarts=*|--poll-seconds=*|--log-file=*)
                set_option "${1%%=*}" "${1#*=}"
                shift ;;
            --config.*=*) OVERRIDES+=("$1"); shift ;;
            --config.*) die "override $1 has no value: write it as $1=VALUE" ;;
            --spot) SPOT=1; shift ;;
            --queued) QUEUED=1; shift ;;
            --reuse) REUSE=1; shift ;;
            --teardown) TEARDOWN=1; shift ;;
            --teardown-on-exit) TEARDOWN_ON_EXIT=1; shift ;;
            --dry-run) DRY_RUN=1; shift ;;
            --) shift; OVERRIDES+=("$@"); break ;;
            *) die "unknown argument '$1' (see --help)" ;;
        esac
    done
}

set_option() {
    case "$1" in
        --project) PROJECT="$2" ;;
        --zone) ZONE="$2" ;;
        --accelerator) ACCELERATOR="$2" ;;
        --runtime-version) RUNTIME_VERSION="$2" ;;
        --tpu-name) TPU_NAME="$2" ;;
        --workdir) WORKDIR="$2" ;;
        --config) CONFIG="$2" ;;
        --env) TRAIN_ENV+=("$2") ;;
        --repo) REPO_URL="$2" ;;
        --ref) REPO_REF="$2" ;;
        --python) PYTHON="$2" ;;
        --max-restarts) MAX_RESTARTS="$2" ;;
        --poll-seconds) POLL_SECONDS="$2" ;;
        --log-file) LOG_FILE="$2" ;;
    esac
}

# accelerator type -> family (v4 | v5p | v5litepod | v6e); dies on a name it cannot use.
accelerator_family() {
    local family="${1%-*}" size="${1##*-}"
    [[ $1 == *-* && $size =~ ^[0-9]+$ ]] \
        || die "accelerator type '$1' is not FAMILY-SIZE; supported: $SUPPORTED"
    case "$family" in
        v4|v5p) (( size > 0 && size % 8 == 0 )) \
            || die "accelerator type '$1': $family sizes count TensorCores," \
                   "a multiple of 8 (e.g. ${family}-32)" ;;
        v5litepod|v6e) [[ " 1 4 8 16 32 64 128 256 " == *" $size "* ]] \
            || die "accelerator type '$1': $family slices have 1, 4, 8, 16, 32, 64, 128 or 256 chips" ;;
        v5e) die "accelerator type '$1': Cloud TPU names v5e slices v5litepod-N (e.g. v5litepod-64)" ;;
        *) die "accelerator type '$1' is not supported; supported: $SUPPORTED" ;;
    esac
    echo "$family"
}

# The runtime (VM image) Cloud TPU recommends for JAX on each family (cloud.google.com/tpu/docs/runtimes).
default_runtime_version() {
    case "$1" in
        v4) echo tpu-ubuntu2204-base ;;
        v5p) echo v2-alpha-tpuv5 ;;
        v5litepod) echo v2-alpha-tpuv5-lite ;;
        v6e) echo v2-alpha-tpuv6e ;;
    esac
}

validate_args() {
    [[ -n $PROJECT ]] || die "no project: pass --project P or set LLADA_PROJECT"
    [[ -n $ZONE ]] || die "no zone: pass --zone Z (e.g. us-west4-a) or set LLADA_ZONE"
    [[ $MAX_RESTARTS =~ ^[0-9]+$ ]] || die "--max-restarts '$MAX_RESTARTS' is not a whole number"
    [[ $POLL_SECONDS =~ ^[0-9]+$ ]] || die "--poll-seconds '$POLL_SECONDS' is not a whole number"
    local env_item
    for env_item in "${TRAIN_ENV[@]}"; do
        [[ $env_item =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env '$env_item' is not KEY=VALUE"
    done
    if [[ -n $ACCELERATOR ]]; then
        local family
        family="$(accelerator_family "$ACCELERATOR")"
        RUNTIME_VERSION="${RUNTIME_VERSION:-$(default_runtime_version "$family")}"
    elif (( ! REUSE && ! TEARDOWN )); then
        die "no accelerator type: pass --accelerator TYPE ($SUPPORTED) or set LLADA_ACCELERATOR"
    elif (( SPOT || QUEUED )) && (( ! TEARDOWN )); then
        die "--spot/--queued recreate the TPU after preemption, which needs --accelerator TYPE"
    fi
    [[ -n $TPU_NAME || -n $ACCELERATOR ]] \
        || die "no TPU name: pass --tpu-name NAME (the default, llada-jax-TYPE, needs --accelerator TYPE)"
    TPU_NAME="${TPU_NAME:-llada-jax-${ACCELERATOR}}"
    [[ $TPU_NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] \
        || die "TPU name '$TPU_NAME' must be lowercase letters, digits and hyphens (pass --tpu-name)"
    LOG_FILE="${LOG_FILE:-$REPO_ROOT/runs/run_tpu/$TPU_NAME.log}"
    (( TEARDOWN )) && return 0
    [[ $WORKDIR == gs://?* ]] \
        || die "workdir '${WORKDIR}' must be a gs:// path that every worker can reach:" \
               "pass --workdir gs://BUCKET/DIR or set LLADA_WORKDIR"
    local config_file=${CONFIG%%:*}
    [[ $config_file == */* || $config_file == *.py ]] || config_file="configs/${config_file}.py"
    if [[ -z $REPO_URL ]] && ! git -C "$REPO_ROOT" cat-file -e "HEAD:${config_file}" 2>/dev/null; then
        die "config ${CONFIG%%:*} (${config_file}) is not in the committed HEAD that gets copied" \
            "to the workers: commit it, or pass --config FILE or a shipped name"
    fi
}

# ---------------------------------------------------------------------------------------------
# Running commands (or printing them under --dry-run)

# Prints its arguments as one line that a POSIX shell (or Python's shlex) splits back into them.
quote_words() {
    local word words=()
    for word in "$@"; do
        if [[ $word =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then words+=("$word"); else words+=("${word@Q}"); fi
    done
    echo "${words[*]}"
}

show_cmd() {
    echo "+ $(quote_words "$@")" >&3  # fd 3 is the script's stdout, also inside $(...)
    if (( ! DRY_RUN )); then echo "+ $(quote_words "$@")" >>"$LOG_FILE"; fi
}

run() {
    show_cmd "$@"
    if (( ! DRY_RUN )); then "$@"; fi
}

# query DRY_RUN_ANSWER CMD...: CMD's stdout, or "" when it fails; DRY_RUN_ANSWER under --dry-run.
query() {
    local answer="$1"
    shift
    show_cmd "$@"
    if (( DRY_RUN )); then echo "$answer"; else "$@" 2>/dev/null || true; fi
}

tpus() {
    run gcloud compute tpus "$@" --zone="$ZONE" --project="$PROJECT"
}

pause() {
    if (( ! DRY_RUN )); then sleep "$POLL_SECONDS"; fi
}

# ---------------------------------------------------------------------------------------------
# The TPU VM / queued resource (both named TPU_NAME; the queued resource's node id is TPU_NAME)

node_state() {
    query "$1" gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" \
        --format='value(state)'
}

queued_state() {
    query "$1" gcloud compute tpus queued-resources describe "$TPU_NAME" --zone="$ZONE" \
        --project="$PROJECT" --format='value(state.state)'
}

create_tpu() {
    local capacity=()
    if (( SPOT )); then capacity=(--spot); fi
    if (( QUEUED )); then
        log "queueing $ACCELERATOR ($RUNTIME_VERSION) as queued resource $TPU_NAME in $ZONE"
        tpus queued-resources create "$TPU_NAME" --node-id="$TPU_NAME" \
            --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME_VERSION" "${capacity[@]}"
    else
        log "creating TPU VM $TPU_NAME: $ACCELERATOR ($RUNTIME_VERSION) in $ZONE"
        tpus tpu-vm create "$TPU_NAME" --accelerator-type="$ACCELERATOR" \
            --version="$RUNTIME_VERSION" "${capacity[@]}"
    fi
}

delete_tpu() {
    if (( QUEUED )); then
        log "deleting queued resource $TPU_NAME and its node"
        tpus queued-resources delete "$TPU_NAME" --force --quiet
    else
        log "deleting TPU VM $TPU_NAME"
        tpus tpu-vm delete "$TPU_NAME" --quiet
    fi
}

# Creates the TPU, or checks that the one to reuse exists.
provision() {
    local state dry_run_answer=""
    if (( REUSE )); then dry_run_answer=EXISTS; fi
    if (( QUEUED )); then state="$(queued_state "$dry_run_answer")"
    else state="$(node_state "$dry_run_answer")"; fi
    if (( REUSE )); then
        [[ -n $state ]] || die "--reuse: no TPU named $TPU_NAME in $ZONE of $PROJECT" \
            "(check --tpu-name, or drop --reuse to create it)"
        log "reusing $TPU_NAME (state $state)"
    else
        [[ -z $state ]] || die "$TPU_NAME already exists in $ZONE (state $state): pass --reuse" \
            "to use it, --teardown to delete it, or another --tpu-name"
        create_tpu
    fi
}

# Waits until the node is READY; a queued resource first waits for capacity (state ACTIVE).
wait_ready() {
    local state
    if (( QUEUED )); then
        while state="$(queued_state ACTIVE)"; [[ $state != ACTIVE ]]; do
            case "$state" in
                FAILED|SUSPENDED|"") die "queued resource $TPU_NAME is ${state:-gone}; see: gcloud" \
                    "compute tpus queued-resources describe $TPU_NAME --zone=$ZONE --project=$PROJECT" ;;
            esac
            log "queued resource $TPU_NAME is $state; waiting for capacity"
            pause
        done
    fi
    while state="$(node_state READY)"; [[ $state != READY ]]; do
        case "$state" in
            PREEMPTED|TERMINATED|STOPPED|"")
                die "TPU VM $TPU_NAME is ${state:-gone} while waiting for READY" ;;
        esac
        log "TPU VM $TPU_NAME is $state; waiting for READY"
        pause
    done
}

# After a run that did not finish: recreate a TPU that is gone; one still READY (ssh was lost) or
# under maintenance is waited for and reused.
recover() {
    case "$1" in
        PREEMPTED|TERMINATED|STOPPED|"")
            [[ -n $ACCELERATOR ]] \
                || die "TPU $TPU_NAME is ${1:-gone}; pass --accelerator TYPE so run_tpu.sh can recreate it"
            delete_tpu || log "delete failed (already gone?); recreating anyway"
            create_tpu ;;
        *)
            if (( QUEUED )) && [[ $(queued_state ACTIVE) == SUSPENDED ]]; then
                delete_tpu
                create_tpu
            fi ;;
    esac
}

# ---------------------------------------------------------------------------------------------
# The project on the workers

jax_version() {
    local version
    version="$(sed -n 's/^[[:space:]]*"jax==\([^"]*\)".*/\1/p' "$REPO_ROOT/pyproject.toml")"
    [[ -n $version ]] || die "no \"jax==X\" pin in $REPO_ROOT/pyproject.toml; jax[tpu] must match it"
    echo "$version"
}

# Copies a git archive of HEAD (or has the workers clone --repo) into ~/$REMOTE_DIR, keeping an
# the existing .venv and compile cache so that a relaunch on the same VM does not reinstall from scratch.
deploy_code() {
    if [[ -n $REPO_URL ]]; then
        log "workers fetch $REPO_URL at $REPO_REF"
        tpus tpu-vm ssh "$TPU_NAME" --worker=all --command="$(quote_words \
            git clone -q "$REPO_URL" "$REMOTE_DIR") 2>/dev/null; cd $REMOTE_DIR && $(quote_words \
            git fetch -q origin "$REPO_REF") && git checkout -q --force FETCH_HEAD && git clean -fdq"
        return
    fi
    if (( ! DRY_RUN )) && [[ -n $(git -C "$REPO_ROOT" status --porcelain --untracked-files=no) ]]; then
        log "warning: uncommitted changes are not copied; the workers get HEAD" \
            "$(git -C "$REPO_ROOT" rev-parse --short HEAD)"
    fi
    run git -C "$REPO_ROOT" archive --format=tar.gz --output="$TARBALL" HEAD
    tpus tpu-vm scp "$TARBALL" "$TPU_NAME:$REMOTE_TARBALL" --worker=all
    tpus tpu-vm ssh "$TPU_NAME" --worker=all --command="mkdir -p $REMOTE_DIR && find $REMOTE_DIR \
-mindepth 1 -maxdepth 1 ! -name .venv ! -name .jax_cache -exec rm -rf {} + \
&& tar -xzf $REMOTE_TARBALL -C $REMOTE_DIR"
}

# The README's install step plus jax[tpu] at the jax version pyproject.toml pins.
install_project() {
    local python
    python="$(quote_words "$PYTHON")"
    log "installing llada-jax and jax[tpu]==$JAX_VERSION on all workers"
    tpus tpu-vm ssh "$TPU_NAME" --worker=all --command="set -e; command -v $python >/dev/null \
|| { sudo apt-get update -q && sudo apt-get install -y -q $python $python-venv; }; cd $REMOTE_DIR \
&& { [ -x .venv/bin/python ] || $python -m venv .venv; } && .venv/bin/pip install -q -e . \
&& .venv/bin/pip install -q 'jax[tpu]==$JAX_VERSION'"
}

# Stops a trainer left over from a run whose ssh was lost: it still holds the TPU and the code.
stop_stale_trainer() {
    # shellcheck disable=SC2016  # $pid expands on the worker
    local cmd='pid="$(cat .llada-jax-train.pid 2>/dev/null)";'
    # shellcheck disable=SC2016
    cmd+=' if [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null;'
    # shellcheck disable=SC2016
    cmd+=' then while kill -0 "$pid" 2>/dev/null; do sleep 5; done; fi; true'
    tpus tpu-vm ssh "$TPU_NAME" --worker=all --command="$cmd"
}

# One shell line for every worker; exec keeps the pid recorded for stop_stale_trainer.
train_command() {
    local env_vars=(
        TPU_STDERR_LOG_LEVEL=1       # libtpu warnings and errors on stderr (full logs: /tmp/tpu_logs)
        TPU_MIN_LOG_LEVEL=0
        JAX_COMPILATION_CACHE_DIR=.jax_cache  # a relaunch on the same VM skips recompiling
        "${TRAIN_ENV[@]}"
    )
    echo "echo \$\$ >.llada-jax-train.pid && cd $REMOTE_DIR && exec $(quote_words env "${env_vars[@]}" \
        .venv/bin/llada-jax train --config "$CONFIG" --workdir "$WORKDIR" "${OVERRIDES[@]}")"
}

# Runs the trainer on all workers, output to the terminal and LOG_FILE; returns its exit status.
launch_training() {
    local rc=0
    log "launching llada-jax train on all workers of $TPU_NAME; log: $LOG_FILE"
    tpus tpu-vm ssh "$TPU_NAME" --worker=all --command="$(train_command)" 2>&1 \
        | tee -a "$LOG_FILE" || rc=${PIPESTATUS[0]}
    return "$rc"
}

# ---------------------------------------------------------------------------------------------

on_exit() {
    if (( TEARDOWN_ON_EXIT )); then delete_tpu || true; fi
    if (( ! DRY_RUN )); then rm -f "$TARBALL"; fi
}

main() {
    parse_args "$@"
    validate_args
    exec 3>&1
    if (( DRY_RUN )); then LOG_FILE=/dev/null; else mkdir -p "$(dirname "$LOG_FILE")"; fi
    if (( TEARDOWN )); then
        delete_tpu
        return
    fi
    JAX_VERSION="$(jax_version)"
    TARBALL="${TMPDIR:-/tmp}/llada-jax-$$.tar.gz"
    trap on_exit EXIT
    provision
    local restarts=0 rc state
    while true; do
        wait_ready
        stop_stale_trainer
        deploy_code
        install_project
        rc=0
        launch_training || rc=$?
        pause  # a preempted VM may take a moment to leave READY after the trainer saved and exited
        state="$(node_state READY)"
        if [[ $state == READY && $rc -ne 255 ]]; then
            (( rc == 0 )) || die "llada-jax train exited with status $rc while $TPU_NAME is READY" \
                "(not a preemption); see $LOG_FILE"
            log "training finished; checkpoints and metrics are in $WORKDIR"
            return 0
        fi
        (( restarts < MAX_RESTARTS )) || die "gave up after $MAX_RESTARTS relaunches" \
            "(last exit $rc, TPU ${state:-gone}); raise --max-restarts to keep going"
        restarts=$((restarts + 1))
        log "run ended (exit $rc, TPU ${state:-gone}); relaunch $restarts/$MAX_RESTARTS" \
            "resumes from the latest checkpoint in $WORKDIR"
        recover "$state"
    done
}

main "$@"
