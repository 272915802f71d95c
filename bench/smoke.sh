#!/usr/bin/env bash
# Runs every bench/ script once at toy sizes: proves each one starts, runs and prints its
# table from this checkout (issue 4: "the scripts run from a clean clone after
# pip install -e .[bench]"). Not a benchmark: the numbers it prints mean nothing.
#
#   apt-get install -y dataset-fashion-mnist && pip install -e ".[bench]"
#   bash bench/smoke.sh [OUT]          # OUT defaults to runs/bench_smoke; ~20 min on 2 cores
#
# Prints one line per script (exit status, seconds) and exits 1 if any script failed;
# each script's whole output is in OUT/<name>.log.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/bench_smoke}
mkdir -p "$out"
export TF_CPP_MIN_LOG_LEVEL=2
failed=0
summary=()

step() {  # step NAME COMMAND...
  local name=$1; shift
  local start=$SECONDS
  echo "== $name: $*"
  "$@" >"$out/$name.log" 2>&1
  local rc=$?
  local line="$name: exit $rc, $((SECONDS - start)) s"
  summary+=("$line")
  echo "   $line; last line: $(grep -v '^\s*$' "$out/$name.log" | tail -n 1 | cut -c1-160)"
  [ "$rc" -eq 0 ] || failed=1
}

# Section 1 of bench/RESULTS.md: the train step against the PyTorch peer, and its profile
# (section 5: the small ResNet's step, also symmetric).
step matmul_peak_probe python bench/matmul_peak_probe.py --sizes=512 --repeats=1
step train_step_bench python bench/train_step_bench.py --steps=1 --rounds=1 \
  --configs=torch_fp32,keras_fp32,keras_xla_fp32,torch_bf16,keras_bf16,keras_bn_bf16
step profile_train_step python bench/profile_train_step.py --encoder=small_resnet --steps=1 --top=5
step profile_train_step_symmetric python bench/profile_train_step.py --encoder=small_resnet --steps=1 --top=5 --symmetric

# Section 2: k-means against faiss and scikit-learn, its A/B against a revision, init and
# the E-step's restarts.
step kmeans_bench python bench/kmeans_bench.py --n=10000 --k=100 --repeats=1 \
  --methods=keras_pcl,keras_pcl_xla,faiss,sklearn --modes=defaults,fixed
step kmeans_bench_memory python bench/kmeans_bench.py --n=10000 --k=100 --memory \
  --methods=keras_pcl,faiss
step kmeans_ab python bench/kmeans_ab.py --base=HEAD --cases=10000x100 --repeats=1
step kmeans_init python bench/kmeans_init.py --n=3000 --k=8 --seeds=1
step estep_restarts python bench/estep_restarts.py --n=3000 --k=8 --repeats=1

# Section 5: the input pipeline alone.
step pipeline_probe python bench/pipeline_probe.py --steps=2 --rounds=1

# Sections 3 and 4: the quality table (tiny PCL v2 and SwAV rows and the two baselines), and the
# E-step share read from that row's run.
step quality_table python bench/quality_table.py --epochs=3 --seeds=0 --rows=pcl_v2,swav \
  --holdout=2000 --out="$out/quality" \
  --extra_flags="--steps_per_epoch=3 --warmup_epochs=1 --knn_every=0"
step estep_share python bench/estep_share.py "$out/quality/pcl_v2_seed0"

# Long-tailed Fashion-MNIST: one cross-entropy row, one epoch.
step long_tail_table python bench/long_tail_table.py --epochs=1 --imbalance=100 --seeds=0 \
  --rows=cross_entropy --out="$out/long_tail"

# Per method, keras_pcl's step against lightly's (one method, one encoder).
step train_step_bench_methods python bench/train_step_bench.py --methods=simclr --encoders=small_resnet \
  --steps=1 --rounds=1
step profile_train_step_swav python bench/profile_train_step.py --method=swav --encoder=small_resnet --steps=1 --top=5
step crop_sizes python bench/crop_sizes.py --encoder=small_resnet --batch=32 --steps=1 --rounds=1

# The lightly peer: one method, a few steps (lightly's heads, losses and LARS in PyTorch).
step lightly_peer python bench/lightly_peer.py --method=simclr --epochs=1 --steps_per_epoch=2 \
  --out="$out/lightly_simclr"
step lightly_input python bench/lightly_input.py --method=simsiam --batches=1

step lightly_table python bench/lightly_table.py --methods=simclr --epochs=1 --seeds=0 --train=false \
  --out="$out/lightly_table"

echo "== summary"
printf '%s\n' "${summary[@]}"
exit "$failed"
