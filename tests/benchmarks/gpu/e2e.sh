# The whole-model run on the lent H200 (repository root; carry .gpu-wheels): `mxmoe bench` at the gpt-oss-20b and
# -120b shapes with the triton and torch engines and transformers as a peer, then the triton engine's conformance
# certificate. Every part writes under $OUT as it goes, so a run cut short still returns what it measured.
# Usage: MXMOE_GIT_COMMIT=<sha> bash tests/benchmarks/gpu/e2e.sh [PART ...] (the parts: the case labels below)
set -o pipefail
source tests/benchmarks/gpu/setup.sh || exit 1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
parts=${*:-bench20 bench120 conformance}
mx="python3 -m mxmoe.core.cli"
for part in $parts; do
  case $part in
    bench20)
      timeout ${T20:-330} $mx bench --shape gpt-oss-20b --backend triton --backend megablocks --backend torch \
        --peer transformers --scenario decode-b1,decode-batch,prefill,memory --context ${CTX20:-1024} --batch 64 \
        --profile --results "$OUT/bench.jsonl" 2>&1 | tee "$OUT/bench20b.txt" ;;
    attn-fused)  # the fused RoPE + cache write + decode attention kernel: check, graph, timing (attention_kernels.py)
      timeout ${TATTN:-120} python3 tests/benchmarks/gpu/attention_kernels.py --fused 2>&1 | tail -40 | tee "$OUT/attn_fused.txt" ;;
    graphs)  # graph replay == eager with the triton engine (engine_graphs.py)
      timeout ${TGRAPHS:-150} python3 tests/benchmarks/gpu/engine_graphs.py 2>&1 | tail -30 | tee "$OUT/graphs.txt" ;;
    bench120)
      timeout ${T120:-150} $mx bench --shape gpt-oss-120b --backend triton --peer none \
        --scenario decode-b1,decode-batch,prefill,memory --context 1024,8192 --batch 64 --profile \
        --results "$OUT/bench.jsonl" 2>&1 | tee "$OUT/bench120b.txt" ;;
    moe-sweep)  # the MoE GEMV variants at T=1/4 against the default (moe_kernels.py --sweep-t1)
      timeout ${TSWEEP:-120} python3 tests/benchmarks/gpu/moe_kernels.py --sweep-t1 ${SWEEP_ARGS:-} 2>&1 | tail -40 ;;
    dense-gemv)  # the triton engine's dense GEMV (linear.py) against cuBLAS at the real shapes
      timeout ${TGEMV:-150} python3 tests/benchmarks/gpu/dense_gemv.py 2>&1 | tail -60 | tee "$OUT/dense_gemv_stdout.txt" ;;
    moe-prefill)  # the dequantize-then-grouped-GEMM prefill path (moe_prefill.py) against the dot kernels
      timeout ${TPREFILL:-150} python3 tests/benchmarks/gpu/moe_prefill.py 2>&1 | tail -60 | tee "$OUT/moe_prefill_stdout.txt" ;;
    moe-winner)  # select the sweep's winner in this copy (CONFIGS["gemv"], one line) and reinstall
      python3 - "$OUT/moe_sweep.txt" <<'PY' && python3 -m pip install -q --no-index --no-deps --no-build-isolation \
          --no-compile --upgrade --target /tmp/site . >/dev/null
import re, sys
line = next(l for l in open(sys.argv[1]) if l.startswith('    "gemv": dict('))
p = "backends/triton_engine/moe.py"
s = open(p).read()
s, n = re.subn(r'^    "gemv": [^\n]*\n(?: {17}[^\n]*\n)?', line.replace("\\", "\\\\"), s, count=1, flags=re.M)
assert n == 1, "CONFIGS['gemv'] line not found"
open(p, "w").write(s)
print("selected:", line.strip())
PY
      ;;
    dot-sweep)  # the batch-decode MoE tiles at T = 64 (moe_bf16.py --sweep64); writes dot_best.json if one beat the default
      timeout ${TDOT:-240} python3 tests/benchmarks/gpu/moe_bf16.py --sweep64 2>&1 | grep -v "^check" | tail -45 ;;
    dot-winner)  # select dot_best.json's tiles in this copy (CONFIGS["dot"], two lines) and reinstall
      [ -f "$OUT/dot_best.json" ] && python3 - "$OUT/dot_best.json" <<'PY' && python3 -m pip install -q --no-index \
          --no-deps --no-build-isolation --no-compile --upgrade --target /tmp/site . >/dev/null
import json, re, sys
best = json.load(open(sys.argv[1]))["config"]
p = "backends/triton_engine/moe.py"
s = open(p).read()
line = (f'    "dot": dict(BLOCK_T={best["BLOCK_T"]}, mlp1=dict({", ".join(f"{k}={v!r}" for k, v in best["mlp1"].items())}),\n'
        f'                mlp2=dict({", ".join(f"{k}={v!r}" for k, v in best["mlp2"].items())})),\n')
s, n = re.subn(r'^    "dot": dict\([^\n]*\n {16}mlp2[^\n]*\n', line.replace("\\", "\\\\"), s, count=1, flags=re.M)
assert n == 1, "CONFIGS['dot'] not found"
open(p, "w").write(s)
print("selected:", line.strip())
PY
      ;;
    bench20-b1)
      timeout ${T20:-200} $mx bench --shape gpt-oss-20b --backend triton \
        --backend triton,router=megablocks,experts=megablocks --peer none \
        --scenario decode-b1,decode-batch,prefill,memory --context 1024 --batch 64 --profile \
        --results "$OUT/bench.jsonl" 2>&1 | tee "$OUT/bench20b-b1.txt" ;;
    mem120)  # gpt-oss-120b at 8k context: memory alone (no batch-64 cache, no 2k prefill activations)
      timeout ${T120:-150} $mx bench --shape gpt-oss-120b --backend triton --peer none \
        --scenario decode-b1,memory --context 8192 \
        --results "$OUT/bench.jsonl" 2>&1 | tee "$OUT/bench120b-8k.txt" ;;
    conformance)
      timeout ${TCONF:-200} $mx conformance --backend triton --device cuda --certify \
        --report "$OUT/triton-cuda-h200" 2>&1 | tail -80 | tee "$OUT/conformance.txt" ;;
  esac
done
