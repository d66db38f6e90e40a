#!/usr/bin/env bash
# Issue 26's ml-100k streams as full-pipeline replicates: for each seed given, the six streams of
# docs/results/stream_ml100k_tiger (DEALRec and Random from scratch and incremental, DEALRec not updated, every
# new-period user incremental), each under <root>/ml100k-tiger-<sampler>-<update>-seed<seed>. A stream resumes where
# it stopped (a finished one returns at once), so the script can be killed and run again; run disjoint seeds in
# parallel workers. Then:
#   python -m recbole_dealrec.stream compare <root>/ml100k-tiger-* --out docs/results/stream_ml100k_tiger \
#       --metric recall@20 --reference "random / scratch"
# usage: bash run_scripts/streams/ml100k_tiger_replicates.sh <root> <seed> [<seed> ...]
set -euo pipefail
root=$1; shift
stream() {  # sampler update seed [extra keys]
  local sampler=$1 update=$2 seed=$3; shift 3
  python -m recbole_dealrec.stream --model=TIGER --config_files=run_scripts/streams/cpu_ml100k_tiger.yaml \
      --sampler="$sampler" --stream_update="$update" --seed="$seed" \
      --stream_output="$root/ml100k-tiger-$sampler-$update-seed$seed" "$@"
}
for seed in "$@"; do
  # round 0 is the same run whatever the update: incremental and none copy the scratch sibling's
  stream dealrec scratch "$seed"
  stream dealrec incremental "$seed" --stream_round0_from="$root/ml100k-tiger-dealrec-scratch-seed$seed"
  stream random scratch "$seed"
  stream random incremental "$seed" --stream_round0_from="$root/ml100k-tiger-random-scratch-seed$seed"
  stream dealrec none "$seed" --stream_round0_from="$root/ml100k-tiger-dealrec-scratch-seed$seed"
  stream full incremental "$seed" --selection_num=None
done
