#!/usr/bin/env bash
# Run an mwjax experiment on a Cloud TPU VM slice (v4 / v5e / v5p), every worker, with retry on preemption.
#
#   launch/tpu_pod.sh --tpu=mw-v4 --zone=us-central2-b --accelerator_type=v4-32 --project=PROJ \
#       --bucket=gs://BUCKET/runs -- --config=llama3_70b --config.model=gs://BUCKET/llama3-70b-orbax
#
# 1. creates the slice when it does not exist (`gcloud compute tpus tpu-vm create`, or a queued resource
#    with --queued; --spot for spot capacity), 2. copies this checkout to every worker (`tpu-vm scp
#    --worker=all`), 3. installs it with jax[tpu] and gcsfs, 4. runs `python -m experiments.macdrop ARGS
#    --config.checkpoint_dir=BUCKET/<tpu>` on all workers at once (process 0's output streams here; the
#    others write ~/mwjax_run.log on their VM). On TPU VMs jax.distributed finds its peers by itself.
#    If the run fails because the slice was preempted, the slice is recreated and the run resumes from the
#    last checkpoint in the bucket (up to --retries times). Results and adapters land in output_dir on
#    worker 0 (`gcloud compute tpus tpu-vm scp --worker=0 mw-v4:~/mwjax/runs/... .` fetches them).
#
# Needs: gcloud (authenticated), TPU quota in the zone, a GCS bucket the TPU service account can write.
# Options: --tpu=NAME --zone=Z --project=P --accelerator_type=T (v4-8) --version=V (tpu-ubuntu2204-base)
#          --bucket=gs://... (required) --spot --queued --retries=N (3) --module=M (experiments.macdrop)
#          --dry_run (print every command instead of running it)
set -euo pipefail

tpu=""; zone=""; project=""; accelerator_type="v4-8"; version="tpu-ubuntu2204-base"; bucket=""; spot=0
queued=0; retries=3; module="experiments.macdrop"; dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu=*) tpu="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --accelerator_type=*) accelerator_type="${1#*=}" ;;
    --version=*) version="${1#*=}" ;;
    --bucket=*) bucket="${1#*=}" ;;
    --spot) spot=1 ;;
    --queued) queued=1 ;;
    --retries=*) retries="${1#*=}" ;;
    --module=*) module="${1#*=}" ;;
    --dry_run) dry_run=1 ;;
    --) shift; break ;;
    *) echo "tpu_pod.sh: unknown option $1 (experiment arguments go after --)" >&2; exit 2 ;;
  esac
  shift
done
for required in tpu zone project bucket; do
  if [[ -z "${!required}" ]]; then echo "tpu_pod.sh: --$required is required" >&2; exit 2; fi
done
[[ "$bucket" == gs://* ]] || { echo "tpu_pod.sh: --bucket must be a gs:// URL (checkpoints must outlive the VMs)" >&2; exit 2; }

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
where=(--zone="$zone" --project="$project")
args=$(printf ' %q' "$@")
experiment="python -m $module$args --config.checkpoint_dir=${bucket%/}/$tpu"
# worker 0 streams its output; the other workers keep theirs on their own disk
worker_id='$(curl -s -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number)'
remote_run="cd ~/mwjax && if [ \"$worker_id\" = 0 ]; then $experiment; else $experiment > ~/mwjax_run.log 2>&1; fi"

run() {  # print, and unless --dry_run, execute
  echo "+ $*"
  [[ "$dry_run" == 1 ]] || "$@"
}

state() {
  [[ "$dry_run" == 1 ]] && { echo "ABSENT"; return; }
  gcloud compute tpus tpu-vm describe "$tpu" "${where[@]}" --format='value(state)' 2>/dev/null || echo "ABSENT"
}

create() {
  local capacity=()
  [[ "$spot" == 1 ]] && capacity=(--spot)
  if [[ "$queued" == 1 ]]; then
    run gcloud compute tpus queued-resources create "$tpu-qr" --node-id="$tpu" "${where[@]}" \
      --accelerator-type="$accelerator_type" --runtime-version="$version" "${capacity[@]}"
    [[ "$dry_run" == 1 ]] || until [[ "$(state)" == READY ]]; do sleep 30; done
  else
    run gcloud compute tpus tpu-vm create "$tpu" "${where[@]}" --accelerator-type="$accelerator_type" \
      --version="$version" "${capacity[@]}"
  fi
}

delete() {
  if [[ "$queued" == 1 ]]; then
    run gcloud compute tpus queued-resources delete "$tpu-qr" "${where[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$tpu" "${where[@]}" --quiet
  fi
}

ship_and_install() {
  local archive=/tmp/mwjax-$tpu.tar.gz
  run bash -c "cd $(printf '%q' "$repo") && git ls-files -z --cached --others --exclude-standard | tar --null -czf $archive -T -"
  run gcloud compute tpus tpu-vm scp "$archive" "$tpu:~/mwjax.tar.gz" "${where[@]}" --worker=all
  run gcloud compute tpus tpu-vm ssh "$tpu" "${where[@]}" --worker=all --command \
    "rm -rf ~/mwjax && mkdir -p ~/mwjax && tar -xzf ~/mwjax.tar.gz -C ~/mwjax && cd ~/mwjax && pip install -e . 'jax[tpu]' gcsfs"
}

for ((attempt = 0; attempt <= retries; attempt++)); do
  current=$(state)
  if [[ "$current" != READY ]]; then
    [[ "$current" != ABSENT ]] && delete  # PREEMPTED, TERMINATED, ...: start over, the bucket keeps the checkpoints
    create
  fi
  ship_and_install
  status=0
  run gcloud compute tpus tpu-vm ssh "$tpu" "${where[@]}" --worker=all --command "$remote_run" || status=$?
  if [[ "$status" == 0 ]]; then exit 0; fi
  if [[ "$(state)" == READY ]]; then
    echo "tpu_pod.sh: the experiment failed (exit $status) on a healthy slice; see the output above" >&2
    exit "$status"
  fi
  echo "tpu_pod.sh: slice $tpu is $(state) (preempted?); retry $((attempt + 1)) of $retries resumes from ${bucket%/}/$tpu" >&2
done
exit 1
