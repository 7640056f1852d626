#!/usr/bin/env bash
# Submit an mwjax experiment to a SLURM GPU cluster: one process per node (default) or per GPU.
#
#   launch/gpu_slurm.sh --nodes=4 --gpus_per_node=8 --partition=gpu -- --config=llama3_8b
#
# Writes launch_logs/<job_name>.sbatch and submits it with sbatch. Inside the job every task gets
# JAX_COORDINATOR_ADDRESS (the first node of the allocation), JAX_NUM_PROCESSES=$SLURM_NTASKS and
# JAX_PROCESS_ID=$SLURM_PROCID, which mwjax.core.distributed.initialize reads. The job is requeued when
# preempted and the experiment resumes from the last checkpoint in its output_dir, which must be on a
# filesystem every node shares (pass --config.output_dir=/shared/path/run).
#
# Options: --nodes=N (1) --gpus_per_node=G (8) --per_gpu (one task per GPU) --partition=P --account=A
#          --time=HH:MM:SS (24:00:00) --job_name=NAME (mwjax) --module=M (experiments.macdrop)
#          --port=P (coordinator port, 12355) --dry_run (print the script and the sbatch command)
set -euo pipefail

nodes=1; gpus=8; per_gpu=0; partition=""; account=""; time_limit="24:00:00"; job_name="mwjax"
module="experiments.macdrop"; port=12355; dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes=*) nodes="${1#*=}" ;;
    --gpus_per_node=*) gpus="${1#*=}" ;;
    --per_gpu) per_gpu=1 ;;
    --partition=*) partition="${1#*=}" ;;
    --account=*) account="${1#*=}" ;;
    --time=*) time_limit="${1#*=}" ;;
    --job_name=*) job_name="${1#*=}" ;;
    --module=*) module="${1#*=}" ;;
    --port=*) port="${1#*=}" ;;
    --dry_run) dry_run=1 ;;
    --) shift; break ;;
    *) echo "gpu_slurm.sh: unknown option $1 (experiment arguments go after --)" >&2; exit 2 ;;
  esac
  shift
done
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tasks_per_node=$([[ "$per_gpu" == 1 ]] && echo "$gpus" || echo 1)
args=$(printf ' %q' "$@")
script="$repo/launch_logs/$job_name.sbatch"

body() {
  echo "#!/bin/bash"
  echo "#SBATCH --job-name=$job_name"
  echo "#SBATCH --nodes=$nodes"
  echo "#SBATCH --ntasks-per-node=$tasks_per_node"
  echo "#SBATCH --gpus-per-node=$gpus"
  [[ -n "$partition" ]] && echo "#SBATCH --partition=$partition"
  [[ -n "$account" ]] && echo "#SBATCH --account=$account"
  echo "#SBATCH --time=$time_limit"
  echo "#SBATCH --requeue"
  echo "#SBATCH --open-mode=append"
  echo "#SBATCH --output=$repo/launch_logs/%x-%j.out"
  echo "set -euo pipefail"
  echo "head=\$(scontrol show hostnames \"\$SLURM_JOB_NODELIST\" | head -n 1)"
  echo "export JAX_COORDINATOR_ADDRESS=\"\$head:$port\""
  echo "cd $(printf '%q' "$repo")"
  local per_task="export JAX_NUM_PROCESSES=\$SLURM_NTASKS JAX_PROCESS_ID=\$SLURM_PROCID"
  [[ "$per_gpu" == 1 ]] && per_task+="; export CUDA_VISIBLE_DEVICES=\$SLURM_LOCALID"
  echo "srun --kill-on-bad-exit=1 bash -c '$per_task; exec python -m $module$args'"
}

if [[ "$dry_run" == 1 ]]; then
  echo "# $script"
  body
  echo "# then: sbatch $script"
  exit 0
fi
mkdir -p "$repo/launch_logs"
body > "$script"
sbatch "$script"
