# PDL experiments in the decode graph (repository root, on the lent H200; carry .gpu-wheels): `mxmoe bench` decode at
# batch 1 (gpt-oss-20b shapes, random weights, ctx 1024) once per setting, each in its own process, the default first
# and last (drift); "default" is the code before early-w became the default (MXMOE_TRITON_GEMV_EARLY_W=0):
#   (run 1 also tried MXMOE_TRITON_PDL_SIGNAL=after: dependents signalled after the wait, not before it; no gain,
#   the switch was removed afterwards)
#   MXMOE_TRITON_GEMV_EARLY_W=1     the dense GEMV's first weights loaded before the wait (linear.EARLY_W, now the
#                                   default).
#   MXMOE_TRITON_EARLY_STATIC=1     norm scales and biases loaded early (pdl.EARLY_STATIC; not measured yet);
#   MXMOE_TRITON_ROUTER_FUSED=1     the router's top-k done by its GEMV's last program (linear.ROUTER_FUSED; not
#                                   measured yet). Check first: MXMOE_TRITON_EARLY_STATIC=1 MXMOE_TRITON_ROUTER_FUSED=1
#                                   python3 -m pytest -q tests/test_triton_{linear,engine,moe}.py
# Usage: bash tests/benchmarks/gpu/pdl_order.sh [interleaved|next]   (records in $OUT/bench.jsonl, output in $OUT/pdl_order.txt)
source tests/benchmarks/gpu/setup.sh || exit 1
OUT=${OUT:-/tmp/pdl_order}
mkdir -p "$OUT"
run() {
  echo "==== $1" | tee -a "$OUT/pdl_order.txt"
  env $2 timeout 150 python3 -m mxmoe.core.cli bench --shape gpt-oss-20b --backend triton --peer none \
    --scenario decode-b1 --context 1024 --repeats ${REPEATS:-20} --results "$OUT/bench.jsonl" 2>&1 | grep -E "decode-b1 B=|limits" \
    | tee -a "$OUT/pdl_order.txt"
}
if [ "${1:-}" = next ]; then  # the two experiments that are off by default, alone and together, against the default
  for i in 1 2; do
    run "default ($i)" "MXMOE_TRITON_EARLY_STATIC=0 MXMOE_TRITON_ROUTER_FUSED=0"
    run "early-static ($i)" "MXMOE_TRITON_EARLY_STATIC=1 MXMOE_TRITON_ROUTER_FUSED=0"
    run "router-fused ($i)" "MXMOE_TRITON_EARLY_STATIC=0 MXMOE_TRITON_ROUTER_FUSED=1"
    run "both ($i)" "MXMOE_TRITON_EARLY_STATIC=1 MXMOE_TRITON_ROUTER_FUSED=1"
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
