# The whole-model run on the lent H200 (repository root; carry .gpu-wheels): `mxmoe bench` at the gpt-oss-20b and
# -120b shapes with the triton and torch engines and transformers as a peer, then the triton engine's conformance
# certificate. Every part writes under $OUT as it goes, so a run cut short still returns what it measured.
# Usage: MXMOE_GIT_COMMIT=<sha> bash tests/benchmarks/gpu/e2e.sh [bench20|bench120|conformance ...]
set -o pipefail
source tests/benchmarks/gpu/setup.sh || exit 1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
parts=${*:-bench20 bench120 conformance}
mx="python3 -m mxmoe.core.cli"
for part in $parts; do
  case $part in
    bench20)
      timeout ${T20:-300} $mx bench --shape gpt-oss-20b --backend triton --backend torch --peer transformers \
        --scenario decode-b1,decode-batch,prefill,ttft,memory --context 1024,8192 --batch 8,64 --profile \
        --results "$OUT/bench.jsonl" 2>&1 | tee "$OUT/bench20b.txt" ;;
    bench120)
      timeout ${T120:-150} $mx bench --shape gpt-oss-120b --backend triton --peer none \
        --scenario decode-b1,decode-batch,prefill,memory --context 1024,8192 --batch 64 --profile \
        --results "$OUT/bench.jsonl" 2>&1 | tee "$OUT/bench120b.txt" ;;
    conformance)
      timeout ${TCONF:-200} $mx conformance --backend triton --device cuda --certify \
        --report "$OUT/triton-cuda-h200" 2>&1 | tail -80 | tee "$OUT/conformance.txt" ;;
  esac
done
