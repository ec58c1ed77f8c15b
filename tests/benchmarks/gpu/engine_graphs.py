"""GPU check of the generation engine's CUDA-graph decode (core/engine.py): graphs == eager, token for token.

Needs CUDA. The engine captures decode steps only when every op's backend claims ``cuda_graphs``; the
reference ``torch`` engine does not (its attention and MoE loops call ``.tolist()``), so this script brings
a small test backend, ``torch-graphs``: the torch engine with a capturable attention (every token reads its
row's first ``max_context_len`` keys under a mask: no host sync) and a capturable MoE (every expert on
every token, weighted by the router's choice; fine for tiny models). The ``triton`` engine is checked too
when it is importable and available.

Checks (each prints PASS/FAIL/SKIP lines; exit status 1 on any FAIL):
  * the rule: ``torch`` runs eager, ``use_graphs=True`` with it is a clear error;
  * DecodeStep: replayed graphs give the eager step's logits (same argmax) for every batch size up to the
    pool, padded buckets included, leave the cache as eager steps do, and never synchronise with the host;
  * Engine: greedy and seeded-sampled requests of different lengths, joining and leaving, give the same
    tokens with graphs as without, in float32 and bfloat16; default sizing from the free memory;
  * timing (information): decode tokens/s of the engine with and without graphs at batch 1, 8, 32.

    source tests/benchmarks/gpu/setup.sh && python3 tests/benchmarks/gpu/engine_graphs.py [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import torch

from mxmoe.backends.reference import TorchBackend, swiglu
from mxmoe.core.backend import OPS
from mxmoe.core.batch import Batch, KVCache
from mxmoe.core.checkpoint import load_checkpoint, write_random_checkpoint
from mxmoe.core.config import preset
from mxmoe.core.engine import DecodeStep, Engine, SamplingParams
from mxmoe.core.model import GptOss

RESULTS: list[dict] = []


def report(status: str, name: str, detail: str = "", **data) -> None:
    print(f"{status} {name}" + (f": {detail}" if detail else ""), flush=True)
    RESULTS.append({"status": status, "check": name, "detail": detail, **data})


class CapturableTorch(TorchBackend):
    """The torch engine with attention and MoE that never synchronise with the host (test backend)."""

    name = "torch-graphs"
    capabilities = TorchBackend.capabilities.model_copy(update={"cuda_graphs": True})

    def attention(self, q, k, v, sinks, k_cache, v_cache, batch: Batch, sliding_window, sm_scale):
        T, Hq, d = q.shape
        Hkv = k.shape[1]
        g = Hq // Hkv
        k_cache.view(-1, Hkv, d)[batch.slot_mapping] = k.to(k_cache.dtype)
        v_cache.view(-1, Hkv, d)[batch.slot_mapping] = v.to(v_cache.dtype)
        compute = torch.promote_types(q.dtype, torch.float32)
        L = batch.max_context_len  # an upper bound: the mask does the rest
        seq = torch.searchsorted(batch.cu_seqlens[1:], torch.arange(T, device=q.device), right=True)  # (T,)
        rows = batch.cache_rows[seq]
        keys = k_cache[rows, :L].to(compute)  # (T, L, Hkv, d)
        vals = v_cache[rows, :L].to(compute)
        k_pos = torch.arange(L, device=q.device)[None, :]
        q_pos = batch.positions[:, None]
        allowed = k_pos <= q_pos  # (T, L)
        if sliding_window:
            allowed = allowed & (q_pos - k_pos < sliding_window)
        qg = q.to(compute).view(T, Hkv, g, d)  # query head h reads KV head h // g
        scores = torch.einsum("tkgd,tlkd->tkgl", qg, keys) * sm_scale
        scores = scores.masked_fill(~allowed[:, None, None, :], float("-inf"))
        sink = sinks.to(compute).view(1, Hkv, g, 1).expand(T, Hkv, g, 1)
        probs = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :-1]
        vals = vals.masked_fill(~allowed[:, :, None, None], 0.0)  # unwritten slots hold NaN
        return torch.einsum("tkgl,tlkd->tkgd", probs, vals).reshape(T, Hq, d).to(q.dtype)

    def prepare_experts(self, mlp1, mlp2, dtype, device):
        self.check(device=device, dtype=dtype)
        return (mlp1.dense(dtype).to(device), mlp1.bias.to(device, dtype),  # (E, 2I, D), (E, 2I)
                mlp2.dense(dtype).to(device), mlp2.bias.to(device, dtype))  # (E, D, I), (E, D)

    def experts(self, x, expert_weights, expert_indices, experts, swiglu_alpha, swiglu_limit):
        w1, b1, w2, b2 = experts
        T, E = x.shape[0], w1.shape[0]
        h = torch.einsum("td,end->ten", x.to(w1.dtype), w1) + b1  # (T, E, 2I)
        y = torch.einsum("tei,edi->ted", swiglu(h, swiglu_alpha, swiglu_limit), w2) + b2  # (T, E, D)
        acc = torch.promote_types(x.dtype, torch.float32)
        gate = torch.zeros(T, E, dtype=acc, device=x.device).scatter(1, expert_indices, expert_weights.to(acc))
        return (y.to(acc) * gate[..., None]).sum(dim=1).to(x.dtype)


def build(path: str, backend, dtype: torch.dtype) -> GptOss:
    config, weights, _ = load_checkpoint(path)
    return GptOss(config, weights, {op: backend for op in OPS}, dtype=dtype, device="cuda")


def ids(vocab: int, n: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def check_rule(path: str) -> None:
    model = build(path, TorchBackend(), torch.float32)
    eng = Engine(model, max_batch=2, max_context=16)
    ok = not eng.decode.uses_graphs
    try:
        Engine(model, max_batch=2, max_context=16, use_graphs=True)
        ok, msg = False, "use_graphs=True with the torch engine did not raise"
    except ValueError as e:
        msg = str(e)
    report("PASS" if ok else "FAIL", "rule: the torch engine runs eager; use_graphs=True is refused", msg)


def check_decode_step(path: str, backend, dtype: torch.dtype, label: str) -> None:
    model = build(path, backend, dtype)
    V = model.config.vocab_size
    num_rows, cache_len = 7, 48  # 6 sequences + a scratch row: buckets 1, 2, 4, 6
    cache = model.new_cache(num_rows, cache_len)
    lens = [5, 17, 3, 9, 12, 1]
    rows = [3, 0, 5, 1, 2, 4]
    with torch.inference_mode():
        prompts = [ids(V, n, seed=10 + i) for i, n in enumerate(lens)]
        model.forward(torch.tensor(sum(prompts, []), device="cuda"),
                      Batch.build(lens, [0] * 6, rows, cache_len, "cuda"), cache)
    eager_cache = KVCache(cache.k.clone(), cache.v.clone())
    graphs = DecodeStep(model, cache, use_graphs=True, scratch_row=6)
    eager = DecodeStep(model, eager_cache, use_graphs=False)
    if not graphs.uses_graphs or graphs.buckets != (1, 2, 4, 6):
        report("FAIL", f"{label}: DecodeStep captured graphs", f"uses_graphs={graphs.uses_graphs}, "
               f"buckets={graphs.buckets}")
        return
    worst, mismatches, synced = 0.0, [], None
    g = torch.Generator().manual_seed(1)
    pos = list(lens)
    for step in range(8):
        for B in (1, 2, 3, 4, 5, 6):
            pick = torch.randperm(6, generator=g)[:B].tolist()
            tok = torch.randint(0, V, (B,), generator=g).cuda()
            p = torch.tensor([pos[i] for i in pick], device="cuda")
            r = torch.tensor([rows[i] for i in pick], device="cuda")
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")  # any host sync in staging or replay raises
            try:
                got = graphs(tok, p, r).clone()
            except RuntimeError as e:
                synced = str(e)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            if synced:
                break
            want = eager(tok, p, r)
            worst = max(worst, float((got.float() - want.float()).abs().max()))
            if not torch.equal(got.argmax(-1), want.argmax(-1)):
                mismatches.append((step, B))
            for i in pick:
                pos[i] += 1
        if synced:
            break
    real = [0, 1, 2, 3, 4, 5]
    same_cache = all(torch.equal(a[:, real].nan_to_num(), b[:, real].nan_to_num())
                     for a, b in ((cache.k, eager_cache.k), (cache.v, eager_cache.v)))
    if synced:
        report("FAIL", f"{label}: DecodeStep graph replay never syncs with the host", synced)
        return
    report("PASS" if not mismatches else "FAIL", f"{label}: DecodeStep graphs == eager (argmax, B = 1..6, padded "
           f"buckets, scratch row)", f"max |logit diff| {worst:.3g}; argmax mismatches {mismatches}",
           max_abs_diff=worst)
    report("PASS" if same_cache else "FAIL", f"{label}: KV cache after graph steps == after eager steps",
           "bit-identical" if same_cache else "differs")


def run_requests(model: GptOss, use_graphs: bool, sampled: bool) -> tuple[list[list[int]], Engine]:
    V = model.config.vocab_size
    eng = Engine(model, max_batch=6, max_context=64, max_step_tokens=16, use_graphs=use_graphs)
    lens = [3, 20, 7, 33, 1, 12, 5, 9]
    max_tokens = [12, 5, 20, 8, 16, 3, 10, 14]
    params = [SamplingParams(max_tokens=k, temperature=1.0 if sampled else 0.0, top_p=0.9 if i % 2 else 1.0,
                             seed=100 + i) for i, k in enumerate(max_tokens)]
    reqs = [eng.submit(ids(V, n, seed=50 + i), sp) for i, (n, sp) in enumerate(zip(lens[:5], params[:5]))]
    for _ in range(4):
        eng.step()
    reqs += [eng.submit(ids(V, n, seed=55 + i), sp) for i, (n, sp) in enumerate(zip(lens[5:], params[5:]))]
    eng.run()
    return [r.token_ids for r in reqs], eng


def check_engine(path: str, backend, dtype: torch.dtype, label: str) -> None:
    model = build(path, backend, dtype)
    for sampled in (False, True):
        kind = "seeded sampling" if sampled else "greedy"
        eager, e1 = run_requests(model, False, sampled)
        graphs, e2 = run_requests(model, True, sampled)
        if not e2.decode.uses_graphs or e1.decode.uses_graphs:
            report("FAIL", f"{label}: engine {kind}", "graphs were not used as asked")
            continue
        diff = [i for i, (a, b) in enumerate(zip(eager, graphs)) if a != b]
        report("PASS" if not diff else "FAIL", f"{label}: engine {kind}, graphs == eager token for token "
               f"(8 requests, 6 rows, joining and leaving)", f"{sum(map(len, eager))} tokens; requests that "
               f"differ: {diff}", tokens=sum(map(len, eager)))


def check_default_sizing(path: str, backend) -> None:
    """Engine() with no sizing arguments on CUDA: rows from the free memory (capped), rows as long as the
    model's context limit, graphs for every bucket, a scratch row beside the pool."""
    model = build(path, backend, torch.bfloat16)
    free = torch.cuda.mem_get_info()[0]
    eng = Engine(model)
    ok = (eng.cache_len == 1024 and eng.num_rows == 64 and eng.decode.uses_graphs
          and eng.decode.buckets == (1, 2, 4, 8, 16, 32, 64) and eng.cache.num_rows == 65)
    out = eng.generate([ids(model.config.vocab_size, 5, seed=1)], SamplingParams(max_tokens=4))[0]
    ok = ok and out.finish_reason == "length" and len(out.token_ids) == 4
    report("PASS" if ok else "FAIL", "default sizing on CUDA", f"{eng.num_rows} rows of {eng.cache_len} tokens "
           f"(+1 scratch), buckets {eng.decode.buckets}, {free / 2**30:.1f} GiB free before")


def timing(path: str, backend, dtype: torch.dtype, label: str) -> None:
    model = build(path, backend, dtype)
    V = model.config.vocab_size
    for B in (1, 8, 32):
        rates = {}
        for use in (False, True):
            eng = Engine(model, max_batch=B, max_context=160, use_graphs=use)
            reqs = [eng.submit(ids(V, 16, seed=i), SamplingParams(max_tokens=128)) for i in range(B)]
            eng.step()  # prefill
            for _ in range(3):
                eng.step()
            torch.cuda.synchronize()
            n0, s0, t0 = sum(len(r.token_ids) for r in reqs), eng.steps, time.perf_counter()
            eng.run()
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            rates[use] = (sum(len(r.token_ids) for r in reqs) - n0) / dt
            rates[f"ms_per_step_{use}"] = 1000 * dt / (eng.steps - s0)
        report("INFO", f"{label}: decode at batch {B}",
               f"eager {rates[False]:.0f} tokens/s ({rates['ms_per_step_False']:.2f} ms/step), graphs "
               f"{rates[True]:.0f} tokens/s ({rates['ms_per_step_True']:.2f} ms/step)",
               batch=B, eager_tokens_per_s=rates[False], graphs_tokens_per_s=rates[True],
               eager_ms_per_step=rates["ms_per_step_False"], graphs_ms_per_step=rates["ms_per_step_True"])


def profile(path: str, backend, dtype: torch.dtype) -> None:
    import cProfile
    import pstats

    model = build(path, backend, dtype)
    for B in (1, 32):
        eng = Engine(model, max_batch=B, max_context=300, use_graphs=True)
        reqs = [eng.submit(ids(model.config.vocab_size, 16, seed=i), SamplingParams(max_tokens=256)) for i in range(B)]
        for _ in range(5):
            eng.step()
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        s0, t0 = eng.steps, time.perf_counter()
        prof.enable()
        eng.run()
        prof.disable()
        dt = time.perf_counter() - t0
        print(f"batch {B}: {1e6 * dt / (eng.steps - s0):.0f} us/step under cProfile", flush=True)
        pstats.Stats(prof).sort_stats("tottime").print_stats(14)
    # Without the profiler: the decode step alone (graph replay + its staging), and the replay alone.
    eng = Engine(model, max_batch=8, max_context=300, use_graphs=True)
    step = eng.decode
    tok = torch.zeros(8, dtype=torch.int64, device="cuda")
    pos = torch.arange(8, device="cuda") + 10
    rows = torch.arange(8, device="cuda")
    for name, fn in (("DecodeStep call, B=8", lambda: step(tok, pos, rows)),
                     ("graph replay alone, B=8", lambda: step._graphs[8][0].replay())):
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(200):
            fn()
        torch.cuda.synchronize()
        print(f"{name}: {1e6 * (time.perf_counter() - t0) / 200:.0f} us", flush=True)


def triton_backend():
    try:
        from mxmoe.backends.triton_engine import TritonBackend
    except Exception as e:  # noqa: BLE001 — another helper's engine may not exist yet
        return None, f"not importable: {type(e).__name__}: {e}"
    b = TritonBackend()
    probe = b.probe("cuda")
    if not probe.available:
        return None, probe.reason
    if not b.capabilities.cuda_graphs:
        return None, "does not claim cuda_graphs"
    return b, ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="also write the results to this JSON file")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--profile", action="store_true", help="only profile the host side of graph decode steps")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        report("FAIL", "CUDA available", "this check needs a CUDA GPU")
        return 1
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
    tmp = tempfile.mkdtemp(prefix="mxmoe-graphs-")
    tiny = f"{tmp}/tiny"
    write_random_checkpoint(tiny, preset("tiny", vocab_size=4096), "original", seed=3)
    if args.profile:
        profile(tiny, CapturableTorch(), torch.bfloat16)
        return 0
    check_rule(tiny)
    backend = CapturableTorch()
    for dtype, name in ((torch.float32, "float32"), (torch.bfloat16, "bfloat16")):
        check_decode_step(tiny, backend, dtype, f"torch-graphs {name}")
        check_engine(tiny, backend, dtype, f"torch-graphs {name}")
    check_default_sizing(tiny, backend)
    tb, why = triton_backend()
    if tb is None:
        report("SKIP", "triton engine", why)
    else:
        tiny64 = f"{tmp}/tiny64"  # the triton engine serves head_dim 64, bfloat16, MXFP4 experts
        write_random_checkpoint(tiny64, preset("tiny", vocab_size=4096, head_dim=64, num_attention_heads=8,
                                               num_key_value_heads=2, hidden_size=128, intermediate_size=128),
                                "original", seed=4)
        try:
            check_decode_step(tiny64, tb, torch.bfloat16, "triton bfloat16")
            check_engine(tiny64, tb, torch.bfloat16, "triton bfloat16")
        except Exception as e:  # noqa: BLE001 — report and go on
            report("FAIL", "triton engine", f"{type(e).__name__}: {e}")
    if not args.no_timing:
        timing(tiny, backend, torch.bfloat16, "torch-graphs bfloat16, tiny (vocab 4096)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "device": torch.cuda.get_device_name(), "results": RESULTS}, f,
                      indent=1)
    failed = [r for r in RESULTS if r["status"] == "FAIL"]
    print(f"{'FAIL' if failed else 'PASS'}: {len(failed)} of {sum(r['status'] in ('PASS', 'FAIL') for r in RESULTS)} "
          f"checks failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
