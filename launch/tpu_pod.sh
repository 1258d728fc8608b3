#!/usr/bin/env bash
# Run one command on every worker of a Cloud TPU slice (or of several slices), from your laptop.
#
#   launch/tpu_pod.sh run --name my-pod --zone us-east5-b --type v6e-16 -- \
#       python -m launch.train --recipe stdlib_tiny --run-dir gs://my-bucket/runs/tiny
#
# `run` creates the slice if it is missing (or deletes and recreates it if it was preempted), copies
# this checkout to every worker, installs .[tpu] there, starts the command on all workers at once
# (detached, so it survives your laptop) and follows worker 0's log. Ctrl-C stops following, not
# training. Rerunning the same command after a preemption resumes from the run's last checkpoint.
# See docs/multihost.md.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_pod.sh COMMAND --name NAME --zone ZONE [options] [-- COMMAND_ON_WORKERS...]

commands:
  up      create the slice(s) if missing or preempted, copy the code, install .[tpu] on every worker
  run     up, stop any earlier run, start COMMAND_ON_WORKERS on every worker, follow worker 0's log
  logs    follow a worker's log (--worker, default 0)
  exec    run COMMAND_ON_WORKERS on every worker, in the foreground (e.g. to fetch data)
  stop    send SIGTERM to the run on every worker (it checkpoints and exits)
  down    delete the slice(s)

options:
  --name NAME        TPU VM name; with --slices N, the queued resource (slices NAME-0 .. NAME-N-1)
  --zone ZONE        e.g. us-east5-b
  --type TYPE        accelerator type to create, e.g. v5litepod-16, v5p-32, v6e-16
  --version VERSION  TPU software version (default for --type: v2-alpha-tpuv5-lite, v2-alpha-tpuv5,
                     v2-alpha-tpuv6e, or tpu-ubuntu2204-base for v4 and older)
  --slices N         multi-slice: N slices of --type through a queued resource (default 1)
  --spot             Spot VMs: much cheaper, preemptible
  --project PROJECT  Google Cloud project (default: gcloud's configured one)
  --git URL[@REF]    workers clone this repository (default: copy this checkout, uncommitted files too)
  --env KEY=VALUE    set on every worker for the run (repeatable), e.g. WANDB_API_KEY=...
  --worker N         logs: which worker (default 0)
  --dry-run          print the gcloud commands instead of running them
EOF
}

die() { echo "error: $*" >&2; exit 2; }

[[ $# -gt 0 ]] || { usage >&2; exit 2; }
case "$1" in
  -h|--help) usage; exit 0 ;;
  up|run|logs|exec|stop|down) action=$1; shift ;;
  *) die "unknown command '$1'; use up, run, logs, exec, stop or down (see --help)" ;;
esac

name="" zone="" type="" version="" slices=1 spot="" project="" git_source="" worker=0 dry_run=""
envs=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name=${2:?--name needs a value}; shift 2 ;;
    --zone) zone=${2:?--zone needs a value}; shift 2 ;;
    --type) type=${2:?--type needs a value}; shift 2 ;;
    --version) version=${2:?--version needs a value}; shift 2 ;;
    --slices) slices=${2:?--slices needs a value}; shift 2 ;;
    --spot) spot=1; shift ;;
    --project) project=${2:?--project needs a value}; shift 2 ;;
    --git) git_source=${2:?--git needs a value}; shift 2 ;;
    --env) [[ ${2:-} == *=* ]] || die "--env takes KEY=VALUE"; envs+=("$2"); shift 2 ;;
    --worker) worker=${2:?--worker needs a value}; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
command=("$@")

[[ -n $name ]] || die "--name is required"
[[ -n $zone ]] || die "--zone is required"
[[ $slices =~ ^[1-9][0-9]*$ ]] || die "--slices=$slices must be a positive integer"
[[ $worker =~ ^[0-9]+$ ]] || die "--worker=$worker must be a worker index"
if [[ $action == run || $action == exec ]]; then
  [[ ${#command[@]} -gt 0 ]] || die "give the command to run on the workers after --"
fi
if [[ -z $version && -n $type ]]; then
  case "$type" in
    v6e-*) version=v2-alpha-tpuv6e ;;
    v5p-*) version=v2-alpha-tpuv5 ;;
    v5litepod-*) version=v2-alpha-tpuv5-lite ;;
    v4-*|v3-*|v2-*) version=tpu-ubuntu2204-base ;;
    *) die "no default --version for --type=$type; pass --version" ;;
  esac
fi

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
remote_dir='~/nnx-lm'  # expanded by the workers' shell
gcloud_flags=(--zone="$zone")
[[ -n $project ]] && gcloud_flags+=(--project="$project")

# Every gcloud call goes through here, so --dry-run shows exactly what would run.
g() {
  if [[ -n $dry_run ]]; then
    local arg flag line=gcloud
    for arg in "$@"; do
      flag=""
      [[ $arg =~ ^(--[a-z-]+=)(.*)$ ]] && flag=${BASH_REMATCH[1]} arg=${BASH_REMATCH[2]}
      if [[ $arg =~ ^[A-Za-z0-9_./:=@,+-]*$ ]]; then line+=" $flag$arg"; else line+=" $flag'${arg//\'/\'\\\'\'}'"; fi
    done
    echo "$line"
  else
    gcloud "$@"
  fi
}

if [[ $slices -gt 1 ]]; then
  # Multi-slice needs a queued resource; its nodes are NAME-0 .. NAME-(N-1).
  describe() { gcloud compute tpus queued-resources describe "$name" "${gcloud_flags[@]}" --format='value(state.state)' 2>/dev/null; }
  create() {
    g compute tpus queued-resources create "$name" "${gcloud_flags[@]}" --accelerator-type="$type" \
      --runtime-version="$version" --node-count="$slices" --node-prefix="$name" ${spot:+--spot}
  }
  delete() { g compute tpus queued-resources delete "$name" "${gcloud_flags[@]}" --force --quiet; }
  ready_state=ACTIVE
  broken_states=" SUSPENDED FAILED "
  on_workers() { g compute tpus queued-resources ssh "$name" "${gcloud_flags[@]}" --worker=all --node=all --command="$1"; }
  on_worker() { g compute tpus queued-resources ssh "$name" "${gcloud_flags[@]}" --worker="$1" --node=0 --command="$2"; }
  copy_to_workers() { g compute tpus queued-resources scp "$1" "$name:$2" "${gcloud_flags[@]}" --worker=all --node=all; }
else
  describe() { gcloud compute tpus tpu-vm describe "$name" "${gcloud_flags[@]}" --format='value(state)' 2>/dev/null; }
  create() {
    g compute tpus tpu-vm create "$name" "${gcloud_flags[@]}" --accelerator-type="$type" --version="$version" \
      ${spot:+--spot}
  }
  delete() { g compute tpus tpu-vm delete "$name" "${gcloud_flags[@]}" --quiet; }
  ready_state=READY
  broken_states=" PREEMPTED TERMINATED STOPPED "
  on_workers() { g compute tpus tpu-vm ssh "$name" "${gcloud_flags[@]}" --worker=all --command="$1"; }
  on_worker() { g compute tpus tpu-vm ssh "$name" "${gcloud_flags[@]}" --worker="$1" --command="$2"; }
  copy_to_workers() { g compute tpus tpu-vm scp "$1" "$name:$2" "${gcloud_flags[@]}" --worker=all; }
fi

ensure_slice() {
  local state=""
  [[ -z $dry_run ]] && state=$(describe || true)
  if [[ -n $state && $broken_states == *" $state "* ]]; then
    echo "tpu_pod: $name is $state (preempted or stopped); deleting it to create it again" >&2
    delete
    state=""
  fi
  if [[ -z $state ]]; then
    [[ -n $type ]] || die "$name does not exist; pass --type (e.g. v6e-16) to create it"
    echo "tpu_pod: creating $name ($type x $slices, $version${spot:+, spot})" >&2
    create
  fi
  if [[ -z $dry_run ]]; then
    until [[ $(describe || true) == "$ready_state" ]]; do
      echo "tpu_pod: waiting for $name to be $ready_state (now: $(describe || echo unknown))" >&2
      sleep 30
    done
  fi
}

ship_code() {
  if [[ -n $git_source ]]; then
    local url=${git_source%@*} ref=main
    [[ $git_source == *@* ]] && ref=${git_source##*@}
    on_workers "set -e; if [ -d $remote_dir/.git ]; then git -C $remote_dir fetch -q origin; \
else git clone -q $(printf %q "$url") $remote_dir; fi; git -C $remote_dir checkout -q $(printf %q "$ref"); \
git -C $remote_dir pull -q --ff-only || true"
  else
    local tarball
    tarball=$(mktemp -t nnx-lm-XXXXXX.tgz)
    # Tracked and untracked files, not what .gitignore excludes (.venv, runs, caches).
    (cd "$repo_root" && git ls-files -z --cached --others --exclude-standard | tar -czf "$tarball" --null -T -)
    copy_to_workers "$tarball" "nnx-lm.tgz"
    rm -f "$tarball"
    on_workers "set -e; mkdir -p $remote_dir && tar -xzf ~/nnx-lm.tgz -C $remote_dir && rm ~/nnx-lm.tgz"
  fi
}

install() {
  # The TPU images ship Python 3.10; uv brings the 3.11 that pyproject.toml requires. gcsfs lets
  # orbax and the run files use gs:// paths.
  on_workers "set -e; cd $remote_dir; export PATH=\$HOME/.local/bin:\$PATH; \
command -v uv >/dev/null || python3 -m pip install -q --user uv; \
[ -x .venv/bin/python ] || uv venv -q --python 3.11 .venv; \
uv pip install -q --python .venv/bin/python -e '.[tpu]' gcsfs"
}

remote_command() {
  # The same command line on every worker; a leading `python` is the workers' project venv.
  local words=("${command[@]}") line="" rest kv
  [[ ${words[0]} == python || ${words[0]} == python3 ]] && words[0]=.venv/bin/python
  for kv in ${envs[@]+"${envs[@]}"}; do line+="$(printf '%q' "$kv") "; done
  printf -v rest ' %q' "${words[@]}"
  echo "$line${rest# }"
}

stop_run() {
  on_workers "if [ -f $remote_dir/logs/run.pid ]; then kill -TERM -- -\$(cat $remote_dir/logs/run.pid) 2>/dev/null \
&& echo \"stopped the run on \$(hostname)\"; rm -f $remote_dir/logs/run.pid; fi; true"
}

case "$action" in
  up)
    ensure_slice; ship_code; install ;;
  run)
    ensure_slice; ship_code; install; stop_run
    # NNXLM_DISTRIBUTED=on: every worker calls jax.distributed.initialize(), which finds the slice's
    # (and other slices') workers by itself. setsid + nohup: the run outlives this ssh session.
    on_workers "set -e; cd $remote_dir; mkdir -p logs; [ -f logs/run.log ] && mv logs/run.log logs/run.\$(date +%s).log; \
NNXLM_DISTRIBUTED=on setsid nohup env $(remote_command) > logs/run.log 2>&1 < /dev/null & echo \$! > logs/run.pid; \
echo \"started on \$(hostname): pid \$(cat logs/run.pid)\""
    echo "tpu_pod: following worker 0 (Ctrl-C stops following; the run goes on). Again: $0 logs --name $name --zone $zone${project:+ --project $project}$([[ $slices -gt 1 ]] && echo " --slices $slices")" >&2
    on_worker 0 "tail -n +1 -F $remote_dir/logs/run.log" ;;
  logs)
    on_worker "$worker" "tail -n +1 -F $remote_dir/logs/run.log" ;;
  exec)
    on_workers "cd $remote_dir 2>/dev/null || true; $(remote_command)" ;;
  stop)
    stop_run ;;
  down)
    delete ;;
esac
