#!/usr/bin/env bash
# Start N cooperating JAX processes on this machine (the multi-host code path, without a cluster).
#
#   launch/local.sh --num_processes=2 --cpu_devices=4 -- python -m experiments.macdrop --config=smollm2_135m
#
# Each process i gets JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT, JAX_NUM_PROCESSES=N, JAX_PROCESS_ID=i
# (read by mwjax.core.distributed.initialize). --cpu_devices=D gives each process D fake CPU devices
# (JAX_PLATFORMS=cpu, --xla_force_host_platform_device_count=D). Process 0's output streams to the
# terminal; process i's goes to LOG_DIR/process_i.log. The script exits with the first non-zero status
# and stops the other processes when one fails or on Ctrl-C.
#
# Options: --num_processes=N (2) --cpu_devices=D (unset: the real devices) --port=P (free port)
#          --log_dir=DIR (./launch_logs) --dry_run (print what would run)
set -euo pipefail

num_processes=2
cpu_devices=""
port=""
log_dir="launch_logs"
dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --num_processes=*) num_processes="${1#*=}" ;;
    --cpu_devices=*) cpu_devices="${1#*=}" ;;
    --port=*) port="${1#*=}" ;;
    --log_dir=*) log_dir="${1#*=}" ;;
    --dry_run) dry_run=1 ;;
    --) shift; break ;;
    *) echo "local.sh: unknown option $1 (put the command after --)" >&2; exit 2 ;;
  esac
  shift
done
if [[ $# -eq 0 ]]; then
  echo "usage: launch/local.sh [--num_processes=N] [--cpu_devices=D] [--port=P] [--dry_run] -- COMMAND ..." >&2
  exit 2
fi
if [[ -z "$port" ]]; then
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi

env_of() {  # the environment of process $1, as NAME=value words
  local env=("JAX_COORDINATOR_ADDRESS=127.0.0.1:$port" "JAX_NUM_PROCESSES=$num_processes" "JAX_PROCESS_ID=$1")
  if [[ -n "$cpu_devices" ]]; then
    env+=("JAX_PLATFORMS=cpu" "XLA_FLAGS=${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$cpu_devices")
  fi
  printf '%s\n' "${env[@]}"
}

if [[ "$dry_run" == 1 ]]; then
  for ((i = 0; i < num_processes; i++)); do
    mapfile -t env < <(env_of "$i")
    printf 'env'; printf ' %q' "${env[@]}" "$@"; printf '\n'
  done
  exit 0
fi

mkdir -p "$log_dir"
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap 'cleanup; exit 130' INT TERM
for ((i = num_processes - 1; i >= 0; i--)); do
  mapfile -t env < <(env_of "$i")
  if [[ $i -eq 0 ]]; then
    env "${env[@]}" "$@" &
  else
    env "${env[@]}" "$@" >"$log_dir/process_$i.log" 2>&1 &
  fi
  pids+=($!)
done
status=0
for _ in "${pids[@]}"; do  # the first process to finish decides: a failure stops the others
  wait -n || status=$?
  if [[ $status -ne 0 ]]; then
    echo "local.sh: a process failed (exit $status); stopping the others (logs in $log_dir/)" >&2
    cleanup
    break
  fi
done
wait || true
exit "$status"
