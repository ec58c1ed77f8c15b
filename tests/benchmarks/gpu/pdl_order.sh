# PDL experiments in the decode graph (repository root, on the lent H200; carry .gpu-wheels): `mxmoe bench` decode at
# batch 1 (gpt-oss-20b shapes, random weights, ctx 1024) once per setting, each in its own process, the default first
# and last (drift); "default" is the code before early-w became the default (MXMOE_TRITON_GEMV_EARLY_W=0):
#   (run 1 also tried MXMOE_TRITON_PDL_SIGNAL=after: dependents signalled after the wait, not before it; no gain,
#   the switch was removed afterwards)
#   MXMOE_TRITON_GEMV_EARLY_W=1     the dense GEMV's first weights loaded before the wait (linear.EARLY_W, now the
#                                   default).
#   MXMOE_TRITON_EARLY_STATIC=1     norm scales and biases loaded early (pdl.EARLY_STATIC; now the default: 1.90,
#                                   1.90 ms against 1.94, 1.93 in run 3, `next`).
#   (run 3 also tried MXMOE_TRITON_ROUTER_FUSED=1: the router's top-k done by its GEMV's last program; 1.98, 1.95 ms
#   alone, 1.94, 1.89 with early-static: no gain, the experiment was removed afterwards)
#   (run 4 tried an L2 prefetch hint: a kernel after QKV bringing the output projection's weights into L2 while
#   attention runs, and one after the experts for the next QKV; MXMOE_TRITON_PREFETCH=bulk|lines,
#   MXMOE_TRITON_PREFETCH_MB=16|32. 2.18-2.27 ms against 1.88-1.97 without: slower, removed afterwards)
#   MXMOE_TRITON_GEMV_EARLY_W=1|2   one or two K steps of weights before the wait (runs 5 and 6, `norm`: two
#                                   1.86, 1.86, 1.99, 1.86 ms, one 1.98, 1.88, 1.87, 1.86; two is the default, as
#                                   certified, not a measured gain);
#   (run 5 also tried MXMOE_TRITON_NORM_FUSED=1: the add + RMSNorm done inside the GEMV after it, QKV, router and
#   unembedding, as Backend API 1.3 fused ops; 2.13-2.31 ms against 1.86-1.98: slower, removed afterwards)
#   MXMOE_TRITON_PDL_MAX_PROGRAMS=n  grids of n programs or more launched without PDL (pdl.MAX_PROGRAMS; not
#                                   measured yet: `grids`, 0 / 512 (the MoE gemv kernels and the unembedding) / 2048
#                                   (the unembedding alone), twice).
# Usage: bash tests/benchmarks/gpu/pdl_order.sh [interleaved|next|norm|grids]   (records in $OUT/bench.jsonl, output in $OUT/pdl_order.txt)
source tests/benchmarks/gpu/setup.sh || exit 1
OUT=${OUT:-/tmp/pdl_order}
mkdir -p "$OUT"
run() {
  echo "==== $1" | tee -a "$OUT/pdl_order.txt"
  env $2 timeout 150 python3 -m mxmoe.core.cli bench --shape gpt-oss-20b --backend triton --peer none \
    --scenario decode-b1 --context 1024 --repeats ${REPEATS:-20} --results "$OUT/bench.jsonl" 2>&1 | grep -E "decode-b1 B=|limits" \
    | tee -a "$OUT/pdl_order.txt"
}
if [ "${1:-}" = next ]; then  # run 3, without the removed router experiment: early-static off and on, twice
  for i in 1 2; do
    run "early-static off ($i)" "MXMOE_TRITON_EARLY_STATIC=0"
    run "early-static on ($i)" "MXMOE_TRITON_EARLY_STATIC=1"
  done
elif [ "${1:-}" = norm ]; then  # run 5: two early K steps against one
  for i in 1 2; do  # (without the removed norm experiment)
    run "early-w 1 ($i)" "MXMOE_TRITON_GEMV_EARLY_W=1"
    run "early-w 2 ($i)" "MXMOE_TRITON_GEMV_EARLY_W=2"
  done
elif [ "${1:-}" = grids ]; then  # large grids without PDL
  for i in 1 2; do
    run "every grid with pdl ($i)" "MXMOE_TRITON_PDL_MAX_PROGRAMS=0"
    run "grids of 512+ without ($i)" "MXMOE_TRITON_PDL_MAX_PROGRAMS=512"
    run "grids of 2048+ without ($i)" "MXMOE_TRITON_PDL_MAX_PROGRAMS=2048"
  done
elif [ "${1:-}" = interleaved ]; then  # the two closest settings alternated three times (run 2)
  for i in 1 2 3; do
    run "default ($i)" "MXMOE_TRITON_GEMV_EARLY_W=0"
    run "early-w ($i)" "MXMOE_TRITON_GEMV_EARLY_W=1"
  done
else  # run 1
  run default "MXMOE_TRITON_GEMV_EARLY_W=0"
  run early-w "MXMOE_TRITON_GEMV_EARLY_W=1"
  run no-pdl "MXMOE_TRITON_PDL=0 MXMOE_TRITON_GEMV_EARLY_W=0"
  run default-again "MXMOE_TRITON_GEMV_EARLY_W=0"
fi
