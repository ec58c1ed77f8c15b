"""Tensor and expert parallelism (core/parallel.py, core/launch.py) on the CPU: gloo ranks in forked processes.

The oracle is the same model in one process (the reference engine): 2 and 4 ranks must give its logits
within float32 rounding (as close to the float64 answer as one float32 process is) and its greedy tokens,
in both expert shardings, on shapes that divide evenly and on shapes whose slices need padding (MXFP4
intermediate blocks, vocabulary rows, replicated KV heads, uneven KV groups and experts); the checkpoints
are written by the project's own writer in all three layouts. Failures must bring the group down with a
message, never hang. Every child process ends with os._exit, so pytest's own teardown never runs twice.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

from mxmoe.backends.reference import TorchBackend
from mxmoe.core import mxfp4
from mxmoe.core.backend import OPS
from mxmoe.core.batch import Batch
from mxmoe.core.checkpoint import _load, load_checkpoint, write_random_checkpoint
from mxmoe.core.config import preset
from mxmoe.core.model import GptOss
from mxmoe.core.parallel import ParallelError, ShardingError, ShardPlan, TorchDistributed, shard_bytes

# name → (config overrides of the tiny preset, layout). "even" divides over 2 and 4 ranks; "padded" needs padding
# everywhere (I = 3 MXFP4 blocks, V = 1001, 2 KV heads replicated over 4 ranks, 6 experts over 4 ranks);
# "uneven" has 3 KV groups over 2 ranks and dense (hf-bf16) experts.
SHAPES = {
    "even": (dict(vocab_size=1024, num_attention_heads=8, num_key_value_heads=4, intermediate_size=128,
                  num_experts=8), "original"),
    "padded": (dict(vocab_size=1001, num_attention_heads=8, num_key_value_heads=2, intermediate_size=96,
                    num_experts=6), "hf"),
    "uneven": (dict(vocab_size=1000, num_attention_heads=6, num_key_value_heads=3, intermediate_size=64,
                    num_experts=5), "hf-bf16"),
}
PROMPT_LENS = (11, 5)  # longer than the tiny preset's window of 8: the banded layer is crossed
DECODE_STEPS = 5
TIMEOUT_S = 30  # of the process group: a broken test fails in seconds, never hangs CI
HANG_TIMEOUT_S = 4  # of the group in which a rank stops answering


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for i, (name, (overrides, layout)) in enumerate(SHAPES.items()):
        d = tmp_path_factory.mktemp(f"par-{name}")
        write_random_checkpoint(d, preset("tiny", **overrides), layout, seed=40 + i)
        out[name] = d
    return out


# ---- running ranks in forked processes -----------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn, rank: int, world: int, port: int, out: Path, timeout: float, args: tuple) -> None:
    code = 0
    try:
        torch.set_num_threads(1)
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout))
        result = fn(rank, world, out, *args)
        (out / f"rank{rank}.json").write_text(json.dumps(result))
    except BaseException:  # noqa: BLE001 - reported to the parent through the file
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_ranks(fn, world: int, out: Path, *args, timeout: float = 150.0, group_timeout: float = TIMEOUT_S,
              grace: float = 10.0) -> tuple[list[int | None], list]:
    """Run ``fn(rank, world, out, *args)`` in ``world`` forked processes joined in one gloo group (collectives time
    out after ``group_timeout`` s); returns the exit codes and each rank's JSON result (None where there is none).
    Kills what is left after ``timeout``, or ``grace`` seconds after rank 0 has ended."""
    out.mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("fork")
    port = _free_port()
    sys.stdout.flush()  # a child must not inherit half-written buffers
    sys.stderr.flush()
    procs = [ctx.Process(target=_child, args=(fn, r, world, port, out, group_timeout, args)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    procs[0].join(timeout)
    deadline = min(deadline, time.monotonic() + grace)
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    results = [json.loads(f.read_text()) if (f := out / f"rank{r}.json").exists() else None for r in range(world)]
    return [p.exitcode for p in procs], results


def _errors(out: Path, world: int) -> str:
    return "\n".join(f"rank {r}:\n{f.read_text()}" for r in range(world) if (f := out / f"rank{r}.err").exists())


# ---- what every rank runs -------------------------------------------------------------------------

def _reference(path: Path, dtype: torch.dtype) -> GptOss:
    config, weights, _ = load_checkpoint(path)
    return GptOss(config, weights, {op: TorchBackend() for op in OPS}, dtype=dtype)


def _sharded(path: Path, dtype: torch.dtype, comm: TorchDistributed, sharding: str) -> GptOss:
    config, _, _ = load_checkpoint(path)
    plan = ShardPlan.make(config, comm.rank, comm.world_size, sharding)
    config, weights, _ = load_checkpoint(path, qkv_rows=plan.qkv_rows)
    return GptOss(config, plan.shard(config, weights, qkv_selected=True), {op: TorchBackend() for op in OPS},
                  dtype=dtype, plan=plan, comm=comm)


@torch.inference_mode()
def _scenario(model: GptOss, ids: torch.Tensor) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Prefill two prompts in one varlen batch (logits at every position), then greedy-decode both together:
    (logits of each step, float64; greedy tokens of each sequence)."""
    S, L = len(PROMPT_LENS), max(PROMPT_LENS) + DECODE_STEPS
    cache = model.new_cache(S, L)
    T = sum(PROMPT_LENS)
    logits = model.forward(ids, Batch.build(list(PROMPT_LENS), [0] * S, list(range(S)), L),
                           cache, logits_rows=torch.arange(T))
    steps = [logits.double()]
    ends = torch.tensor(PROMPT_LENS).cumsum(0) - 1
    tokens = [[] for _ in range(S)]
    nxt = logits[ends].argmax(-1)
    for i in range(DECODE_STEPS):
        for s in range(S):
            tokens[s].append(int(nxt[s]))
        logits = model.forward(nxt, Batch.build([1] * S, [n + i for n in PROMPT_LENS], list(range(S)), L), cache)
        steps.append(logits.double())
        nxt = logits.argmax(-1)
    return steps, tokens


def _compare(rank: int, world: int, out: Path, cases: list[tuple[str, str, str]], groups: list[list[int]]) -> dict:
    """Each case (shape, checkpoint, sharding) on the group of this rank (``groups``: the ranks of each group)."""
    import torch.distributed as dist

    handles = [dist.new_group(g) for g in groups] if groups else [None]
    group = next(h for g, h in zip(groups or [list(range(world))], handles) if rank in (g or range(world)))
    comm = TorchDistributed(group)
    report = {}
    for name, path, sharding in cases:
        torch.manual_seed(0)
        config = load_checkpoint(path)[0]
        ids = torch.randint(0, config.vocab_size, (sum(PROMPT_LENS),), generator=torch.Generator().manual_seed(7))
        ref32, tok32 = _scenario(_reference(Path(path), torch.float32), ids)
        ref64, tok64 = _scenario(_reference(Path(path), torch.float64), ids)
        got32, gtok32 = _scenario(_sharded(Path(path), torch.float32, comm, sharding), ids)
        got64, gtok64 = _scenario(_sharded(Path(path), torch.float64, comm, sharding), ids)
        what = f"{name}/{sharding} on {comm.world_size} ranks"
        assert gtok32 == tok32, f"{what}: greedy tokens {gtok32}, one process {tok32}"
        assert gtok64 == tok64 == tok32, f"{what}: float64 greedy tokens {gtok64}, one process {tok64}"
        err32 = max((g - r).abs().max().item() for g, r in zip(got32, ref32))
        own32 = max((r32 - r64).abs().max().item() for r32, r64 in zip(ref32, ref64))  # one process's rounding
        err64 = max((g - r).abs().max().item() for g, r in zip(got64, ref64))
        assert torch.isfinite(torch.stack([s.abs().max() for s in got32])).all(), f"{what}: non-finite logits"
        # As close to the exact (float64) answer as one float32 process is, within a small factor.
        assert err32 <= 4 * own32 + 1e-6, f"{what}: float32 logits off by {err32:.3g}; one process {own32:.3g}"
        assert err64 <= 1e-11, f"{what}: float64 logits off by {err64:.3g}"
        # The tokens' agreement means something: every greedy choice won by far more than the rounding.
        margin = min((s.topk(2, dim=-1).values[:, 0] - s.topk(2, dim=-1).values[:, 1]).min().item() for s in ref64[1:])
        assert margin > 20 * max(err32, own32), f"{what}: greedy margin {margin:.3g} too close to rounding"
        report[f"{what}"] = {"err32": err32, "own32": own32, "err64": err64, "tokens": gtok32}
    return report


def test_ranks_give_one_process_logits_and_tokens(checkpoints, tmp_path):
    """4 ranks (even and padded shapes), then two groups of 2 (even + padded; uneven) in the same processes."""
    cases4 = [(n, str(checkpoints[n]), s) for n in ("even", "padded") for s in ("intermediate", "expert")]
    codes, results = run_ranks(_phase_4_then_2, 4, tmp_path, cases4,
                               {"first": [(n, str(checkpoints[n]), s) for n in ("even", "padded")
                                          for s in ("intermediate", "expert")],
                                "second": [("uneven", str(checkpoints["uneven"]), s)
                                           for s in ("intermediate", "expert")]})
    assert codes == [0, 0, 0, 0], _errors(tmp_path, 4)
    cases = results[0]
    assert len(cases) == 4 + 4 and len(results[2]) == 4 + 2  # every case ran on each group
    for r in results:
        for what, figures in r.items():
            print(what, {k: v for k, v in figures.items() if k != "tokens"})


def _phase_4_then_2(rank, world, out, cases4, cases2):
    report = _compare(rank, world, out, cases4, [])
    half = [[0, 1], [2, 3]]
    mine = cases2["first"] if rank < 2 else cases2["second"]
    report.update(_compare(rank, world, out, mine, half))
    return report


# ---- what each rank holds (no processes) ---------------------------------------------------------

@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("sharding", ["intermediate", "expert"])
def test_plans_cover_the_model_once_on_block_boundaries(world, sharding):
    cfg = preset("tiny", **SHAPES["padded"][0])
    if world == 3:  # 2 KV heads over 3 ranks: refused, naming the sizes that work
        with pytest.raises(ShardingError, match=r"cannot be split over 3 ranks.*world sizes that work: 1, 2, 4, 8"):
            ShardPlan.make(cfg, 0, world, sharding)
        return
    if sharding == "expert" and world > cfg.num_experts:
        with pytest.raises(ShardingError, match="by expert"):
            ShardPlan.make(cfg, 0, world, sharding)
        return
    plans = [ShardPlan.make(cfg, r, world, sharding) for r in range(world)]
    q = [h for p in plans for h in range(*p.q_heads)]
    assert q == list(range(cfg.num_attention_heads))  # every query head once, in rank order
    G = cfg.num_attention_heads // cfg.num_key_value_heads
    for p in plans:  # a rank's query heads read only its KV heads
        assert {h // G for h in range(*p.q_heads)} == set(range(*p.kv_heads))
    if sharding == "intermediate":
        widths = {p.intermediate[2] for p in plans}
        assert len(widths) == 1 and widths.pop() % 32 == 0  # equal, whole MXFP4 blocks
        cols = [j for p in plans for j in range(*p.intermediate[:2])]
        assert cols == list(range(cfg.intermediate_size))
        assert all(p.intermediate[0] % 32 == 0 and p.intermediate[1] % 32 == 0 for p in plans)
        assert all(p.experts == (0, cfg.num_experts) for p in plans)
    else:
        assert [e for p in plans for e in range(*p.experts)] == list(range(cfg.num_experts))
        assert max(p.experts[1] - p.experts[0] for p in plans) - min(p.experts[1] - p.experts[0] for p in plans) <= 1
    assert [v for p in plans for v in range(*p.vocab[:2])] == list(range(cfg.vocab_size))
    assert {p.vocab[2] for p in plans} == {-(-cfg.vocab_size // world)}


def test_padded_slices_contribute_exactly_zero(checkpoints):
    """I = 3 MXFP4 blocks: rank 3 of 4 holds only padding, rank 1 of 2 one real block and one padded. The padding
    is zero bytes (+0 at any scale) with zero biases; a rank holding only padding adds exactly zero (mlp2's bias
    is rank 0's alone), and a padded slice gives what its real part alone gives."""
    path = checkpoints["padded"]
    config, weights, _ = load_checkpoint(path)
    b = TorchBackend()
    x = torch.randn(7, config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    mlp = weights.blocks[0].mlp
    w, idx = b.router(x, b.prepare_linear(mlp.gate_weight, mlp.gate_bias, torch.float64, "cpu"),
                      config.experts_per_token)

    def run(m):
        return b.experts(x, w, idx, b.prepare_experts(m.mlp1, m.mlp2, torch.float64, "cpu"), config.swiglu_alpha,
                         config.swiglu_limit)

    for world, rank, expected in ((4, 3, (96, 96, 32)), (2, 1, (64, 96, 64))):
        plan = ShardPlan.make(config, rank, world)
        assert plan.intermediate == expected
        real = expected[1] - expected[0]
        m = plan.shard_block(config, weights.blocks[0]).mlp
        assert m.mlp1.out_features == 2 * expected[2] and m.mlp2.in_features == expected[2]
        pad1 = mxfp4.dequantize(m.mlp1.blocks[:, 2 * real:], m.mlp1.scales[:, 2 * real:], torch.float64)
        pad2 = mxfp4.dequantize(m.mlp2.blocks[:, :, real // 32:], m.mlp2.scales[:, :, real // 32:], torch.float64)
        assert pad1.numel() and pad2.numel()
        assert torch.equal(pad1, torch.zeros_like(pad1)) and not torch.signbit(pad1).any()
        assert torch.equal(pad2, torch.zeros_like(pad2)) and not torch.signbit(pad2).any()
        assert torch.equal(m.mlp1.bias[:, 2 * real:], torch.zeros_like(m.mlp1.bias[:, 2 * real:]))
        assert torch.equal(m.mlp2.bias, torch.zeros_like(m.mlp2.bias))  # not rank 0: the bias is added once
        out = run(m)
        if real == 0:
            assert torch.equal(out, torch.zeros_like(out))
        else:
            unpadded = dataclasses.replace(plan, intermediate=(expected[0], expected[1], real))
            exact = run(unpadded.shard_block(config, weights.blocks[0]).mlp)
            assert out.abs().max() > 0.01
            torch.testing.assert_close(out, exact, rtol=0, atol=1e-12)  # float64: only the order of the sum moves


@pytest.mark.parametrize("name", ["even", "padded", "uneven"])
def test_each_rank_reads_only_its_shard(checkpoints, name):
    """Every tensor a rank gets is a view of the memory-mapped files (nothing else read, nothing copied) except
    the few it must copy — its own qkv rows (Hugging Face's q/k/v are separate tensors), padded slices — and
    those hold only its part."""
    path, world = checkpoints[name], 2
    config = load_checkpoint(path)[0]
    full = None
    for rank in range(world):
        plan = ShardPlan.make(config, rank, world)
        config, weights, layout, _d, where = _load(path, plan.qkv_rows)
        ranges = [f.mapped_range() for f in set(where.values())]
        mapped = (lambda t: any(lo <= t.data_ptr() < hi for lo, hi in ranges))
        shard = plan.shard(config, weights, qkv_selected=True)
        blk = shard.blocks[0]
        a, m = blk.attn, blk.mlp
        d = config.head_dim
        assert a.qkv_weight.shape[0] == (plan.num_heads + 2 * plan.num_kv_heads) * d  # its heads' rows only
        assert mapped(a.out_weight) and a.out_weight.shape[1] == plan.num_heads * d
        assert mapped(a.sinks) and a.sinks.shape[0] == plan.num_heads
        j0, j1, width = plan.intermediate
        for e in (m.mlp1, m.mlp2):
            data = e.blocks if e.blocks is not None else e.weight
            assert mapped(data) == (j1 - j0 == width), f"{name} rank {rank}: expert slice viewed iff unpadded"
        assert m.mlp1.out_features == 2 * width and m.mlp2.in_features == width
        full = full or shard_bytes(load_checkpoint(path)[1])
        # No rank holds the whole model: at most its share of the sharded tensors plus the replicated ones.
        assert shard_bytes(shard) < 0.8 * full


def test_only_engines_claiming_sharded_serve_a_sharded_model():
    from mxmoe.backends.megablocks import MegaBlocksBackend
    from mxmoe.plugins import resolve_backends

    assert TorchBackend.capabilities.sharded and not MegaBlocksBackend.capabilities.sharded
    res = resolve_backends("auto", device="cpu", dtype="float32", sharded=True)
    assert all(b.capabilities.sharded for b in res.ops.values())
    # megablocks claims the CPU in float32 and serves experts unsharded; sharded, it is passed over, saying why.
    assert resolve_backends("experts=megablocks", device="cpu", dtype="float32").ops["experts"].name == "megablocks"
    reasons = [r.reason for d in res.trace for r in d.rejected if r.backend == "megablocks"]
    assert reasons and all("does not claim it can run sharded" in r for r in reasons), res.explain()


def test_an_engine_may_bring_its_own_collectives():
    """The first engine (in op order) whose communicator() answers supplies the collectives; a communicator of
    another rank or world size is refused."""
    import types

    from mxmoe.core.launch import Launch
    from mxmoe.core.parallel import SingleProcess

    class Vendor(SingleProcess):
        rank, world_size = 1, 2

    class VendorEngine(TorchBackend):
        name = "vendor"

        def communicator(self, rank, world_size, device):
            return Vendor() if (rank, world_size) == (1, 2) else SingleProcess()

    ops = {op: TorchBackend() for op in OPS}
    ops["experts"] = VendorEngine()
    me = types.SimpleNamespace(rank=1, world_size=2, timeout_s=1.0)
    assert isinstance(Launch._communicator(me, ops, torch.device("cpu")), Vendor)
    with pytest.raises(ShardingError, match="communicator"):
        Launch._communicator(types.SimpleNamespace(rank=0, world_size=2, timeout_s=1.0), ops, torch.device("cpu"))


# ---- launch: rank 0 drives, the others follow; failures ---------------------------------------------

def _driver(rank, world, out, path, fail: str):
    """Rank 0 generates through a Launch (its model broadcasts every cache and step); rank 1 follows. Then rank 1
    fails ("raise": an error in its experts op; "hang": it stops answering) and rank 0 must hear of it."""
    from mxmoe.core.launch import Launch

    launch = Launch(rank, world, timeout_s=TIMEOUT_S if fail == "raise" else HANG_TIMEOUT_S)
    if rank != 0:
        calls = {"n": 0}
        real = TorchBackend.experts

        def experts(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] > 12:  # 2 layers a step: fails in the 7th step
                if fail == "hang":
                    time.sleep(10_000)
                raise RuntimeError("injected failure")
            return real(self, *args, **kwargs)

        TorchBackend.experts = experts
        sys.stderr = open(out / "rank1.stderr", "w", buffering=1)  # what this rank says when it fails
        launch.follow()
        return {"followed": True}
    prompt = list(range(1, 9))
    model = launch.load_model(path, backend="torch", dtype="float32")
    first = list(model.generate(prompt, max_tokens=5))
    config, weights, _ = load_checkpoint(path)
    alone = GptOss(config, weights, {op: TorchBackend() for op in OPS}, dtype=torch.float32)
    expected = list(alone.generate(prompt, max_tokens=5))
    t0 = time.monotonic()
    try:
        list(model.generate(prompt, max_tokens=5))
        raise AssertionError("rank 1 failed, but rank 0 went on")
    except ParallelError as e:
        message = str(e)
    return {"first": first, "expected": expected, "message": message, "seconds": time.monotonic() - t0,
            "broken": launch.broken}


@pytest.mark.parametrize("fail", ["raise", "hang"])
def test_a_failing_rank_takes_the_group_down(checkpoints, tmp_path, fail):
    codes, results = run_ranks(_driver, 2, tmp_path, str(checkpoints["padded"]), fail, timeout=60, grace=2,
                               group_timeout=TIMEOUT_S if fail == "raise" else HANG_TIMEOUT_S)
    assert codes[0] == 0, _errors(tmp_path, 2)
    r = results[0]
    assert r["first"] == r["expected"] and len(r["first"]) == 5  # the driven steps give one process's tokens
    assert r["broken"]
    assert "rank 0 of 2" in r["message"] and "another rank failed" in r["message"], r["message"]
    if fail == "raise":
        assert codes[1] == 1
        said = (tmp_path / "rank1.stderr").read_text()
        assert "mxmoe: rank 1 of 2 failed: RuntimeError: injected failure" in said, said
        assert r["seconds"] < 10, r  # the closed connection is seen at once, not after the timeout
    else:
        assert f"stopped answering for {HANG_TIMEOUT_S} s" in r["message"], r["message"]
        assert 3 < r["seconds"] < 20, r  # the timeout, not a hang


# ---- torchrun, end to end ------------------------------------------------------------------------

def test_torchrun_generate_prints_once_and_matches_one_process(tmp_path):
    from mxmoe.core.tokenizer import load_tokenizer

    d = tmp_path / "full-vocab"  # the CLI's tokenizer needs the real vocabulary
    write_random_checkpoint(d, preset("tiny", **{**SHAPES["even"][0], "vocab_size": 201088}), "hf", seed=5)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MXMOE_DIST_TIMEOUT": str(TIMEOUT_S)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "mxmoe.core.cli", "generate", "--model", str(d), "--raw", "--prompt", "Hello", "--prompt",
           "a longer second prompt", "--max-tokens", "6", "--json", "--dtype", "float32", "--shard-experts", "expert"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=150, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 2 and len(done.stdout.splitlines()) == 2, done.stdout  # rank 0 alone printed
    tok = load_tokenizer(model_dir=d)
    alone = _reference(d, torch.float32)
    for line, text in zip(lines, ["Hello", "a longer second prompt"]):
        assert line["finish_reason"] == "length"
        assert line["token_ids"] == list(alone.generate(tok.encode(text), max_tokens=6))
