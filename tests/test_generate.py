from __future__ import annotations

import pytest
import torch

from mxmoe.core.checkpoint import write_random_checkpoint
from mxmoe.core.cli import main
from mxmoe.core.config import preset
from mxmoe.core.generate import sample
from mxmoe.core.model import load_model


def test_greedy_is_argmax_and_breaks_ties_low():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample(logits), logits.argmax(-1))
    tied = torch.tensor([[0.0, 3.0, 3.0, 1.0]])
    assert sample(tied).item() == 1


def test_top_p_keeps_the_smallest_set_reaching_p():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p=0.75 keeps {0, 1}; 0.81 also keeps 2; 0.3 only the top token.
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()[None].expand(4000, 4)
    g = torch.Generator().manual_seed(1)
    for top_p, allowed in ((0.75, {0, 1}), (0.81, {0, 1, 2}), (0.3, {0})):
        drawn = set(sample(logits, temperature=1.0, top_p=top_p, generator=g).tolist())
        assert drawn == allowed, top_p


def test_temperature_sampling_follows_the_softmax():
    logits = torch.tensor([[1.0, 0.0, -1.0]]).expand(20000, 3)
    g = torch.Generator().manual_seed(2)
    counts = torch.bincount(sample(logits, temperature=2.0, generator=g), minlength=3).double() / 20000
    expected = torch.softmax(torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64) / 2.0, dim=0)
    assert (counts - expected).abs().max() < 0.015  # ~4 standard errors at n = 20000


def test_bad_sampling_parameters():
    with pytest.raises(ValueError, match="temperature >= 0 and 0 < top_p <= 1"):
        sample(torch.zeros(1, 3), temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        sample(torch.zeros(1, 3), temperature=1.0, top_p=0.0)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    write_random_checkpoint(d, preset("tiny"), "hf", seed=7)  # the real vocabulary: the CLI decodes text
    return d


def test_cli_generate_streams_the_greedy_completion(tiny_dir, capsys):
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "Hi there", "--raw", "--max-tokens", "6",
                 "--dtype", "float32"]) == 0
    out, err = capsys.readouterr()
    model = load_model(tiny_dir, backend="torch", dtype="float32")
    tok = model.tokenizer
    expected = list(model.generate(tok.encode("Hi there"), max_tokens=6,
                                   stop_tokens=[tok.special("<|endoftext|>")]))
    assert out == tok.decode(expected) + "\n"
    assert "tokens/s" in err and f"{len(expected)} tokens" in err


def test_cli_generate_renders_a_harmony_prompt(tiny_dir, capsys):
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "Hi", "--max-tokens", "3", "--dtype",
                 "float32"]) == 0
    _, err = capsys.readouterr()
    # system message + user message + "<|start|>assistant": far more than the 1-2 tokens of "Hi".
    prompt_len = int(err.split("prompt of ")[1].split(" tokens")[0])
    assert prompt_len > 20


def test_cli_generate_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = capsys.readouterr().out
    for flag in ("--model", "--prompt", "--prompts", "--json", "--raw", "--max-tokens", "--temperature", "--top-p",
                 "--seed", "--max-batch", "--max-context", "--max-step-tokens", "--cuda-graphs", "--backend",
                 "--strict", "--device", "--dtype"):
        assert flag in out


def test_caller_code_between_tokens_is_not_in_inference_mode(tiny_dir):
    model = load_model(tiny_dir, backend="torch", dtype="float32")
    for _ in model.generate([1, 2, 3], max_tokens=3):
        assert not torch.is_inference_mode_enabled()


def test_sample_rows_each_row_as_if_alone():
    """A row's token depends only on its own logits, settings and uniform draw, not on its batch-mates."""
    from mxmoe.core.generate import sample_rows

    g = torch.Generator().manual_seed(4)
    logits = torch.randn(6, 300, generator=g) * 3
    temperature = torch.tensor([0.0, 1.0, 0.7, 1.0, 2.0, 1.0])
    top_p = torch.tensor([1.0, 1.0, 0.9, 0.5, 1.0, 0.2])
    uniform = torch.rand(6, generator=g)
    together = sample_rows(logits, temperature, top_p, uniform)
    for i in range(6):
        alone = sample_rows(logits[i:i + 1], temperature[i:i + 1],
                            top_p[i:i + 1] if top_p[i] < 1 else None, uniform[i:i + 1])
        assert together[i] == alone[0], i
    assert together[0] == logits[0].argmax()
    # Inverse CDF: the token is the one whose probability interval holds u (vocabulary order).
    probs = torch.softmax(logits[1] / 1.0, dim=-1)
    cdf = probs.cumsum(0)
    t = int(together[1])
    assert (cdf[t - 1] if t else 0.0) <= uniform[1] * cdf[-1] < cdf[t]


def _json_lines(out: str) -> list[dict]:
    import json

    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_cli_several_prompts_as_one_batch_with_json(tiny_dir, tmp_path, capsys):
    texts = ["Hi there", "The capital of France is", "one two three four five"]
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text(texts[2] + "\n\n")
    assert main(["generate", "--model", str(tiny_dir), "--prompt", texts[0], "--prompt", texts[1], "--prompts",
                 str(prompts_file), "--raw", "--max-tokens", "5", "--dtype", "float32", "--json",
                 "--max-batch", "2"]) == 0
    out, err = capsys.readouterr()
    rows = _json_lines(out)
    assert [r["prompt"] for r in rows] == texts
    model = load_model(tiny_dir, backend="torch", dtype="float32")
    tok = model.tokenizer
    for r, text in zip(rows, texts):
        assert set(r) == {"prompt", "token_ids", "text", "finish_reason"}
        want = list(model.generate(tok.encode(text), max_tokens=5, stop_tokens=[tok.special("<|endoftext|>")]))
        assert r["token_ids"] == want and r["text"] == tok.decode(want)
        assert r["finish_reason"] == ("stop" if want[-1] == tok.special("<|endoftext|>") else "length")
    assert "3 prompts" in err and "tokens/s" in err and "time to first token" in err


def test_cli_batch_with_a_failing_prompt(tiny_dir, capsys):
    long = " ".join(["word"] * 40)
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "Hi", "--prompt", long, "--raw",
                 "--max-tokens", "3", "--dtype", "float32", "--max-context", "12"]) == 1
    out, err = capsys.readouterr()
    assert "=== prompt 1: 'Hi' (length) ===" in out
    assert "=== prompt 2:" in out and "(error)" in out
    assert "does not fit the KV cache: a row holds 12 tokens" in err
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "Hi", "--prompt", long, "--raw",
                 "--max-tokens", "3", "--dtype", "float32", "--max-context", "12", "--json"]) == 1
    rows = _json_lines(capsys.readouterr().out)
    assert [r["finish_reason"] for r in rows] == ["length", "error"]
    assert len(rows[0]["token_ids"]) == 3 and rows[1]["token_ids"] == [] and "does not fit" in rows[1]["error"]


def test_cli_cuda_graphs_on_without_cuda_is_a_clear_error(tiny_dir, capsys):
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "Hi", "--raw", "--max-tokens", "2", "--dtype",
                 "float32", "--cuda-graphs", "on"]) == 2
    assert "CUDA graphs were asked for, but the model is on cpu" in capsys.readouterr().err


def test_a_long_prompt_is_prefilled_with_a_progress_bar(tiny_dir, capsys):
    """A prompt longer than the step budget takes several prefill steps: the bar counts its tokens on stderr,
    and the completion is the one the engine gives without the bar."""
    from mxmoe.core.engine import Engine, SamplingParams
    from mxmoe.core.generate import _prefill_with_progress

    model = load_model(tiny_dir, backend="torch", dtype="float32")
    prompt = torch.randint(0, model.config.vocab_size, (40,), generator=torch.Generator().manual_seed(9)).tolist()

    def completion(bar: bool) -> list[int]:
        eng = Engine(model, max_batch=1, max_context=64, max_step_tokens=16)
        req = eng.submit(prompt, SamplingParams(max_tokens=3))
        _prefill_with_progress(eng, req, enabled=bar)
        if bar:
            assert req.prefilled == 40 and eng.steps == 3  # 16 + 16 + 8 tokens, the last step samples
        return list(eng.stream(req))

    plain = completion(False)
    assert "prefill" not in capsys.readouterr().err
    assert completion(True) == plain
    err = capsys.readouterr().err
    assert "prefill" in err and "16/40" in err and "32/40" in err  # cleared when the first token comes
