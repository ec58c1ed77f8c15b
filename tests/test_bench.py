"""``mxmoe bench``: the harness end to end on the CPU (``--quick``, in process and as a subprocess), its
byte and FLOP model against independent counts, the transformers peer against the torch engine on the
same weights, the on-device random weights, and bad input. No timing assertions: only that figures
exist, are consistent with each other and with the model of the step."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import re
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mxmoe.core import bench
from mxmoe.core.batch import Batch
from mxmoe.core.checkpoint import (_flat_group, _fp4_scale_exponent, _groups, expected_tensors,
                                   write_random_checkpoint)
from mxmoe.core.cli import main
from mxmoe.core.config import preset
from mxmoe.core.model import GptOss, load_model
from mxmoe.plugins import resolve_backends

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
TIMED = ("load", "decode-b1", "decode-batch", "prefill", "prefill-batch", "ttft")
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


@pytest.fixture(autouse=True)
def one_thread():
    # Many tiny ops: intra-op threads only oversubscribe a shared 2-core machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_model(dtype: torch.dtype, seed: int = 0) -> GptOss:
    cfg = preset("tiny")
    ops = resolve_backends("torch", device=CPU, dtype=dtype).ops
    return GptOss(cfg, bench.random_weights_on_device(cfg, CPU, seed), ops, dtype=dtype, device=CPU, progress=False)


# ---- the harness end to end -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("bench") / "results.jsonl"
    path.write_text('{"earlier": "line"}\n')  # appended to, never overwritten
    rc = main(["bench", "--quick", "--profile", "--results", str(path)])
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == {"earlier": "line"}
    return rc, [json.loads(line) for line in lines[1:]]


def test_quick_run_writes_every_field(quick_run):
    rc, records = quick_run
    assert rc == 0
    assert records
    assert len({r["run_id"] for r in records}) == 1
    for r in records:
        assert datetime.fromisoformat(r["date"]).tzinfo is not None
        assert r["device"]["type"] == "cpu" and r["device"]["name"]
        assert "driver" in r["device"]
        v = r["versions"]
        assert v["torch"] == torch.__version__ and v["mxmoe"] == importlib.metadata.version("mxmoe")
        assert {"python", "triton", "transformers"} <= set(v)
        if (ROOT / ".git").exists() and shutil.which("git"):
            assert re.fullmatch(r"[0-9a-f]{40}", r["commit"]), r["commit"]
            assert isinstance(r["dirty"], bool)
        else:
            assert "commit" in r
        assert r["model"]["shape"] == "tiny" and r["model"]["dtype"] == "bfloat16" and r["model"]["experts"] == "mxfp4"
        assert r["command"].startswith("mxmoe bench --shape tiny --device cpu")
        lim = r["limits"]
        assert lim["copy_bytes_per_s"] > 0 and lim["matmul_flops_per_s"] > 0
        assert math.isfinite(lim["copy_bytes_per_s"]) and math.isfinite(lim["matmul_flops_per_s"])
        assert r["settings"]["repeats"] == 3


def test_quick_run_has_every_scenario_on_each_engine(quick_run):
    _, records = quick_run
    torch_rows = [r for r in records if r["engine"] == "torch"]
    assert all(r["status"] == "ok" for r in torch_rows), [r["status"] for r in torch_rows]
    assert set(bench.SCENARIOS) | {"profile"} == {r["scenario"] for r in torch_rows}
    assert sorted(r["params"]["context"] for r in torch_rows if r["scenario"] == "decode-b1") == [32, 128]
    assert sorted(r["params"]["batch"] for r in torch_rows if r["scenario"] == "decode-batch") == [2, 4]
    assert all(r["ops"] == {op: "torch" for op in r["ops"]} and len(r["ops"]) == 7 for r in torch_rows)
    peers = [r for r in records if r["engine_kind"] == "peer"]
    if HAS_TRANSFORMERS:
        assert {r["scenario"] for r in peers} == set(bench.SCENARIOS) | {"profile"}
        assert all(r["status"] == "ok" for r in peers), [r["status"] for r in peers]
        first = {(r["scenario"], json.dumps(r["params"])): r["figures"] for r in torch_rows}
        for r in peers:  # ratios against the first engine of the same case
            if "median_s" in r["figures"]:
                base = first[r["scenario"], json.dumps(r["params"])]["median_s"]
                assert r["figures"]["speedup_vs_first"] == pytest.approx(base / r["figures"]["median_s"])
    else:
        assert [r["status"] for r in peers] == ["not installed (pip install transformers)"]


def test_quick_run_figures_agree_with_the_model_of_the_step(quick_run):
    _, records = quick_run
    cfg = preset("tiny")
    for r in records:
        if r["status"] != "ok" or r["scenario"] not in TIMED:
            continue
        f, lim, p = r["figures"], r["limits"], r["params"]
        assert 0 < f["min_s"] <= f["median_s"] <= f["max_s"]
        assert f["repeats"] == (1 if r["scenario"] == "load" else 3)
        assert f["speedup_vs_first"] > 0
        if r["engine"] == "torch":
            assert f["speedup_vs_first"] == 1.0
        if r["scenario"].startswith("decode"):
            assert f["finite"] is True
            assert f["tokens_per_s"] == pytest.approx(p["batch"] / f["median_s"])
            if p["batch"] == 1:  # one token: exactly k distinct experts in every layer
                assert f["experts_per_layer"] == [cfg.experts_per_token] * cfg.num_hidden_layers
            expected = bench.decode_bytes(cfg, torch.bfloat16, p["batch"], p["context"], f["experts_per_layer"])
            assert f["bytes_breakdown"] == expected and f["bytes"] == expected["total"]
            assert f["fraction_of_bandwidth"] == pytest.approx(f["bytes"] / f["median_s"] / lim["copy_bytes_per_s"])
            assert f["roofline_tokens_per_s"] == pytest.approx(p["batch"] * lim["copy_bytes_per_s"] / f["bytes"])
        if r["scenario"].startswith("prefill"):
            lens = [p["prompt_len"]] * p["batch"]
            assert f["flops_breakdown"] == bench.prefill_flops(cfg, lens)
            assert f["tokens_per_s"] == pytest.approx(sum(lens) / f["median_s"])
            assert f["fraction_of_matmul"] == pytest.approx(f["flops"] / f["median_s"] / lim["matmul_flops_per_s"])
        if r["scenario"] == "ttft":
            assert 0 < f["fraction_of_matmul"] == pytest.approx(f["floor_s"] / f["median_s"])
    memory = [r for r in records if r["scenario"] == "memory"]
    assert memory and all(r["figures"]["peak_rss_bytes"] > 2**20 and r["figures"]["peak_device_bytes"] is None
                          for r in memory)
    assert all(0 < r["figures"]["fraction_of_host_memory"] < 1 for r in memory)


def test_quick_run_profiles_name_the_top_ops(quick_run):
    _, records = quick_run
    profiles = [r for r in records if r["scenario"] == "profile"]
    assert {r["params"]["of"] for r in profiles} == {"decode-b1", "prefill"}
    for r in profiles:
        top = r["figures"]["top"]
        assert top and all(row["name"] and row["calls"] >= 1 and 0 < row["share"] <= 1 for row in top)
        assert sum(row["share"] for row in top) <= 1 + 1e-9
        assert [row["self_s"] for row in top] == sorted((row["self_s"] for row in top), reverse=True)


def test_subprocess_run_prints_the_table_and_appends(tmp_path):
    out = tmp_path / "sub.jsonl"
    proc = subprocess.run([sys.executable, "-m", "mxmoe.core.cli", "bench", "--quick", "--scenario", "decode-b1,load",
                           "--context", "12", "--peer", "none", "--results", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "limits: copy" in proc.stdout and "scenario" in proc.stdout and "decode-b1" in proc.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["scenario"], r["status"]) for r in records] == [
        ("load", "ok"), ("decode-b1", "ok"), ("peer", "not requested (--peer none)")]
    assert records[1]["params"] == {"batch": 1, "context": 12}
    assert records[1]["figures"]["fraction_of_bandwidth"] > 0


def test_default_results_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert bench._results_path(None) == Path("mxmoe-bench.jsonl")
    (tmp_path / "tests" / "benchmarks" / "results").mkdir(parents=True)
    assert bench._results_path(None) == Path("tests/benchmarks/results/bench.jsonl")
    assert bench._results_path("x/y.jsonl") == Path("x/y.jsonl")


def test_plot(tmp_path, capsys):
    png = tmp_path / "tps.png"
    argv = ["bench", "--quick", "--scenario", "decode-b1,decode-batch", "--context", "8", "--batch-context", "8",
            "--batch", "2", "--repeats", "1", "--warmup", "0", "--peer", "none", "--no-results", "--plot", str(png)]
    rc = main(argv)
    if importlib.util.find_spec("matplotlib") is None:
        assert rc == 2 and "--plot needs matplotlib" in capsys.readouterr().err
        assert not png.exists()
    else:
        assert rc == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- the byte and FLOP model against independent counts -------------------------------------------

class _RouterSpy:
    """Stands in for the router backend and keeps the experts each call picked."""

    def __init__(self, backend):
        self.backend, self.picked = backend, []

    def router(self, x, gate, top_k):
        w, idx = self.backend.router(x, gate, top_k)
        self.picked.append(sorted(set(idx.flatten().tolist())))
        return w, idx

    def __getattr__(self, name):
        return getattr(self.backend, name)


@pytest.mark.parametrize("batch,context", [(1, 5), (3, 20)])  # 20 > the tiny window (8): banded layers cut
def test_decode_bytes_match_the_model_tensors(batch, context):
    model = tiny_model(torch.bfloat16, seed=1)
    cfg = model.config
    spy = _RouterSpy(model.ops["router"])
    model.ops["router"] = spy
    with torch.inference_mode():
        setup = bench.MxmoeSubject("torch", model, "torch", 0.0).decode(batch, context, seed=3)
    assert setup.routing == spy.picked  # what the experts op received is what the router chose
    if batch == 1:
        assert all(len(r) == cfg.experts_per_token for r in setup.routing)
    per_key = 2 * model.new_cache(1, 1).k[0, 0, 0].nbytes  # K and V of one position, all KV heads
    expected = {"attention": 0, "experts": 0, "router": 0, "kv_cache": 0, "norms_sinks": model.norm.nbytes,
                "unembedding": model.unembedding.weight.nbytes, "embedding": batch * model.embedding[0].nbytes}
    for i, layer in enumerate(model.layers):
        expected["attention"] += sum(t.nbytes for t in (layer.qkv.weight, layer.qkv.bias, layer.out.weight,
                                                        layer.out.bias))
        expected["router"] += layer.gate.weight.nbytes + layer.gate.bias.nbytes
        expected["norms_sinks"] += layer.attn_norm.nbytes + layer.mlp_norm.nbytes + layer.sinks.nbytes
        for e in spy.picked[i]:
            for lin in (layer.experts.mlp1, layer.experts.mlp2):
                expected["experts"] += lin.blocks[e].nbytes + lin.scales[e].nbytes + lin.bias[e].nbytes
        # Keys the query at position `context` may see, by the reference's own mask rule.
        j = torch.arange(context + 1)
        visible = j <= context
        if layer.sliding_window:
            visible &= context - j < layer.sliding_window
        expected["kv_cache"] += batch * int(visible.sum()) * per_key
    expected["total"] = sum(expected.values())
    got = bench.decode_bytes(cfg, torch.bfloat16, batch, context, [len(r) for r in spy.picked])
    assert got == expected


def test_decode_bytes_of_dense_experts_as_stored(tmp_path):
    # An hf-bf16 checkpoint stores experts dense in bf16: the torch engine keeps them so (dequantizing
    # nothing) even with float32 activations, and the byte model counts them so.
    cfg = preset("tiny")
    write_random_checkpoint(tmp_path, cfg, "hf-bf16", seed=0)
    model = load_model(tmp_path, backend="torch", dtype="float32")
    layer = model.layers[0].experts
    per_expert = sum(lin.weight[0].nbytes + lin.bias[0].nbytes for lin in (layer.mlp1, layer.mlp2))
    assert layer.mlp1.weight.dtype == torch.bfloat16 and layer.mlp1.bias.dtype == torch.float32
    assert bench.expert_bytes(cfg, torch.float32, dense_dtype=torch.bfloat16) == per_expert
    got = bench.decode_bytes(cfg, torch.float32, 1, 3, [2, 3], dense_experts=torch.bfloat16)
    assert got["experts"] == 5 * per_expert


def test_prefill_flops_match_a_flop_counter():
    model = tiny_model(torch.float32, seed=2)
    cfg, lens = model.config, [13, 6]
    cache = model.new_cache(2, max(lens))
    batch = Batch.build(lens, [0, 0], [0, 1], cache.cache_len)
    ids = torch.randint(0, cfg.vocab_size, (sum(lens),), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.forward(ids, batch, cache)
    flops = bench.prefill_flops(cfg, lens)
    # The reference scores every (query, key) pair of a sequence and masks afterwards: n² pairs a layer.
    hd = cfg.num_attention_heads * cfg.head_dim
    dense_attention = 4 * hd * cfg.num_hidden_layers * sum(n * n for n in lens)
    assert counter.get_total_flops() == flops["linear"] + flops["unembedding"] + dense_attention
    # The pairs a causal, banded kernel must compute, counted from an explicit mask.
    pairs = 0
    for layer in range(cfg.num_hidden_layers):
        w = cfg.layer_sliding_window(layer)
        for n in lens:
            q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
            mask = (k <= q) & ((q - k < w) if w else True)
            pairs += int(mask.sum())
    assert flops["attention"] == 4 * hd * pairs
    assert flops["total"] == flops["linear"] + flops["attention"] + flops["unembedding"]


def test_published_budget_of_gpt_oss_20b():
    # PERF.md's batch-1 decode budget at 1k context: ~1.27 GB attention, ~1.27 GB experts, ~1.16 GB
    # unembedding, ~3.7 GB in all.
    cfg = preset("gpt-oss-20b")
    b = bench.decode_bytes(cfg, torch.bfloat16, 1, 1024, [4] * cfg.num_hidden_layers)
    assert b["attention"] == pytest.approx(1.27e9, rel=0.01)
    assert b["experts"] == pytest.approx(1.27e9, rel=0.01)
    assert b["unembedding"] == pytest.approx(1.16e9, rel=0.01)
    assert b["total"] == pytest.approx(3.7e9, rel=0.02)


# ---- the weights the harness makes and the peer it compares with ----------------------------------

def test_random_weights_on_device_have_the_checkpoint_shapes_and_band():
    cfg = preset("tiny")
    weights = bench.random_weights_on_device(cfg, CPU, seed=5)
    expected = expected_tensors(cfg, "original")
    got = {}
    for group in _groups(cfg):
        got.update(_flat_group(weights, group))
    assert set(got) == set(expected)
    for name, t in got.items():
        assert tuple(t.shape) == expected[name].shape, name
        assert t.dtype == (torch.uint8 if expected[name].kind == "u8" else torch.bfloat16), name
    e0 = _fp4_scale_exponent(cfg.hidden_size) + 127
    assert set(weights.blocks[0].mlp.mlp1.scales.unique().tolist()) == {e0 - 1, e0, e0 + 1}
    assert torch.equal(weights.blocks[1].attn.qkv_weight, weights.blocks[1].attn.qkv_weight)  # the same each time
    assert not torch.equal(weights.blocks[0].attn.qkv_weight, weights.blocks[1].attn.qkv_weight)
    model = tiny_model(torch.float32, seed=5)
    logits = model.logits(torch.arange(100, 140))
    assert torch.isfinite(logits).all() and 0.1 < logits.std() < 100


def test_building_never_holds_the_canonical_weights_of_every_layer(monkeypatch):
    # An engine that converts at prepare (here: bf16 → float32) must see one canonical layer at a time: the
    # blocks are made on demand and dropped once prepared (at most the previous one is still referenced).
    import weakref

    made = []
    make = bench._random_block

    def tracked(*args):
        block = make(*args)
        made.append(weakref.ref(block.attn.qkv_weight))
        return block

    monkeypatch.setattr(bench, "_random_block", tracked)
    cfg = preset("tiny", num_hidden_layers=6)
    ops = resolve_backends("torch", device=CPU, dtype=torch.float32).ops
    alive_at_prepare = []
    prepare = type(ops["experts"]).prepare_experts

    def spy(self, *args):
        alive_at_prepare.append(sum(r() is not None for r in made))
        return prepare(self, *args)

    monkeypatch.setattr(type(ops["experts"]), "prepare_experts", spy)
    model = GptOss(cfg, bench.random_weights_on_device(cfg, CPU, 0), ops, dtype=torch.float32, device=CPU,
                   progress=False)
    assert len(made) == cfg.num_hidden_layers and max(alive_at_prepare) <= 2
    assert all(r() is None for r in made)
    assert model.layers[0].qkv.weight.dtype == torch.float32


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers not installed (the test extra has it)")
def test_transformers_peer_matches_the_torch_engine_on_the_same_weights():
    cfg = preset("tiny")
    ours = bench.MxmoeSubject("torch", tiny_model(torch.float32, seed=4), "torch", 0.0)
    hf = bench.build_transformers(cfg, bench.random_weights_on_device(cfg, CPU, 4), torch.float32, CPU)
    peer = bench.TransformersSubject(hf, cfg, torch.float32, CPU, 0.0)
    assert sum(t.nbytes for t in hf.parameters()) == bench.hf_bytes(cfg, torch.float32)
    with torch.inference_mode():
        ids = torch.randint(0, cfg.vocab_size, (20,), generator=torch.Generator().manual_seed(1))
        expected = ours.model.logits(ids)
        assert (hf(input_ids=ids[None]).logits[0] - expected).abs().max() <= 1e-4
        # Decode with the same random KV cache (context past the sliding window) in each one's own cache.
        a, b = ours.decode(2, 12, seed=7), peer.decode(2, 12, seed=7)
        assert (a.first_logits - b.first_logits).abs().max() <= 1e-4
        assert a.routing == b.routing
        assert torch.isfinite(b.step()).all()  # the peer's next step, at position 13
        assert ours.first_token(ids.tolist()) == peer.first_token(ids.tolist()) == int(expected[-1].argmax())


# ---- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,message", [
    (["--shape", "gpt-oss-7b"], "invalid choice"),
    (["--scenario", "decode-b2"], "unknown scenario decode-b2"),
    (["--batch", "8,x"], "comma-separated positive integers"),
    (["--context", "0"], "comma-separated positive integers"),
    (["--prefill-batch", "8by512"], "SEQUENCESxTOKENS"),
    (["--repeats", "-1"], "positive integer"),
    (["--shape", "tiny", "--model", "somewhere"], "not allowed with argument"),
    (["--peer", "vllm"], "invalid choice"),
])
def test_bad_flags_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_values_exit_2_with_a_message(tmp_path, capsys):
    cases = [(["--quick", "--backend", "nosuch"], "no engine named 'nosuch'"),
             (["--quick", "--backend", "attention=,"], "--backend attention=,"),
             (["--quick", "--dtype", "int3"], "unknown dtype"),
             (["--model", str(tmp_path / "missing")], "no such folder")]
    if torch.cuda.is_available():
        cases.append((["--quick", "--device", f"cuda:{torch.cuda.device_count()}"], "CUDA device(s)"))
    else:
        cases.append((["--quick", "--device", "cuda"], "no CUDA device"))
    for argv, message in cases:
        assert main(["bench", *argv, "--results", str(tmp_path / "r.jsonl")]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("mxmoe bench: ") and message in err, (argv, err)
    assert not (tmp_path / "r.jsonl").exists()


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--shape", "--model", "--backend", "--scenario", "--context", "--batch", "--batch-context",
                 "--prefill-len", "--prefill-batch", "--repeats", "--warmup", "--device", "--dtype", "--peer",
                 "--profile", "--results", "--no-results", "--plot", "--quick", "--seed", "--strict"):
        assert flag in out
    assert "fraction" in out and "exit status" in out
