"""`gainrl-pl evaluate` on tiny offline models: files, statistics, resume, sharding, scoring, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gainrl_pl.evaluation import evaluate as evaluate_module
from gainrl_pl.evaluation.backends import ModelSpec, TransformersBackend, load_backend, resolve_model_spec
from gainrl_pl.evaluation.evaluate import evaluate, resolve_shard
from gainrl_pl.evaluation.metrics import pass_at_k, wilson_interval
from gainrl_pl.evaluation.results import read_samples, repair_tail
from gainrl_pl.evaluation.sets import BENCHMARKS, load_benchmark
from gainrl_pl.rewards import AccuracyReward, accuracy_reward, extract_prediction

GEN = {"max_new_tokens": 12, "progress": False}


@pytest.fixture(scope="module")
def talky_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with larger random weights: greedy output varies by prompt and contains digits.

    (The fixture model's small init makes greedy decoding print the same token for every prompt, which
    would make "sharded == unsharded" and the scoring test pass vacuously.)
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    path = tmp_path_factory.mktemp("talky")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def engine(talky_model_dir):
    """One loaded transformers backend shared by the tests (loading is most of a tiny run's time)."""
    return load_backend(ModelSpec(str(talky_model_dir), label="talky"))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def toy_rows(n: int = 8) -> list[dict]:
    return [{"q": f"What is {i} + {i + 3}?", "a": str(2 * i + 3)} for i in range(n)]


def run(engine, data, out, **kwargs):
    return evaluate(data=str(data), question_field="q", answer_field="a", output_dir=out, backend=engine,
                    **{**GEN, **kwargs})


def test_end_to_end_greedy_files_and_numbers(engine, tmp_path):
    data = write_jsonl(tmp_path / "toy.jsonl", toy_rows(6))
    summary = run(engine, data, tmp_path / "out", batch_size=4)
    records = read_samples(tmp_path / "out" / "samples.jsonl")
    assert sorted(r["index"] for r in records) == list(range(6))
    assert all(len(r["completions"]) == len(r["correct"]) == len(r["lengths"]) == 1 for r in records)
    assert all(r["gold"] == str(2 * r["index"] + 3) for r in records)

    correct = sum(r["correct"][0] for r in records)
    assert summary == json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["benchmark"] == "toy" and summary["prompts"] == 6 and summary["missing"] == 0
    assert summary["accuracy"] == pytest.approx(correct / 6)
    assert summary["pass_at_k"] == {"pass@1": pytest.approx(correct / 6)}
    assert summary["ci95"] == pytest.approx(list(wilson_interval(correct, 6)))
    assert summary["mean_length"] == pytest.approx(sum(r["lengths"][0] for r in records) / 6)
    assert 0 < summary["mean_length"] <= GEN["max_new_tokens"]
    table = (tmp_path / "out" / "summary.md").read_text().splitlines()
    assert table[0].startswith("| model | benchmark | n |") and len(table) == 3
    assert "| `talky` | toy | 6 | 1 |" in table[2] and f"{100 * correct / 6:.1f}%" in table[2]


def test_scoring_is_the_training_reward_on_recorded_completions(engine, tmp_path):
    """Golds crafted from what the model answers: the checker must mark exactly those right.

    The tiny random model never boxes, so its answers are read by the `flexible` rule (last number).
    """
    rows = toy_rows(8)
    first = run(engine, write_jsonl(tmp_path / "probe.jsonl", rows), tmp_path / "probe",
                answer_extraction="flexible")
    predictions = {r["index"]: r["predictions"][0] for r in read_samples(tmp_path / "probe" / "samples.jsonl")}
    assert first["prompts"] == 8
    crafted = []
    for i, row in enumerate(rows):
        pred = predictions[i]
        if pred is not None and i % 2 == 0 and pred.lstrip("-").isdigit():
            # an equal value written differently: only a real answer checker calls this a match
            gold = f"\\frac{{{2 * int(pred)}}}{{2}}"
        elif pred is not None and i % 2 == 0:
            gold = pred
        else:
            gold = "123456789"  # a number the tiny model does not print
        crafted.append({**row, "a": gold})
    expected_right = sum(1 for row in crafted if row["a"] != "123456789")
    assert expected_right >= 2, f"the tiny model printed too few numbers to test scoring: {predictions}"

    summary = run(engine, write_jsonl(tmp_path / "crafted.jsonl", crafted), tmp_path / "crafted",
                  answer_extraction="flexible")
    records = read_samples(tmp_path / "crafted" / "samples.jsonl")
    for record in records:  # greedy: the same completions as the probe run
        assert record["predictions"][0] == predictions[record["index"]]
        recomputed = AccuracyReward("flexible")([""], record["completions"], answer=[record["gold"]])
        assert [bool(x) for x in recomputed] == record["correct"]
        assert record["correct"][0] == (record["gold"] != "123456789")
    assert summary["accuracy"] == pytest.approx(expected_right / 8)
    assert summary["answer_extraction"] == "flexible"

    # the same completions under the paper's rule: no box, no answer; the option is recorded and never mixed
    boxed = run(engine, write_jsonl(tmp_path / "crafted.jsonl", crafted), tmp_path / "boxed")
    assert boxed["answer_extraction"] == "boxed" and boxed["accuracy"] == 0.0
    assert all(r["predictions"] == [None] for r in read_samples(tmp_path / "boxed" / "samples.jsonl"))
    assert (tmp_path / "boxed" / "summary.md").read_text().splitlines()[2].endswith("| boxed |")
    with pytest.raises(ValueError, match="answer_extraction: 'boxed' there, 'flexible' now"):
        run(engine, write_jsonl(tmp_path / "crafted.jsonl", crafted), tmp_path / "boxed", answer_extraction="flexible")


def test_resume_generates_only_new_prompts(engine, tmp_path, monkeypatch):
    generated = []
    original = TransformersBackend.generate

    def counting(self, prompt_ids, **kwargs):
        generated.append(len(prompt_ids))
        return original(self, prompt_ids, **kwargs)

    monkeypatch.setattr(TransformersBackend, "generate", counting)
    data = write_jsonl(tmp_path / "toy.jsonl", toy_rows(10))
    out = tmp_path / "out"
    run(engine, data, out, limit=4, batch_size=3)
    before = (out / "samples.jsonl").read_text()
    assert sum(generated) == 4
    summary = run(engine, data, out, limit=8, batch_size=3)
    assert sum(generated) == 8  # only the 4 new prompts were generated
    after = (out / "samples.jsonl").read_text()
    assert after.startswith(before) and len(after.splitlines()) == 8
    assert summary["prompts"] == 8
    run(engine, data, out, limit=8)  # everything done: no generation at all
    assert sum(generated) == 8

    with pytest.raises(ValueError, match="max_new_tokens"):  # other settings never mix into the samples
        run(engine, data, out, limit=8, max_new_tokens=5)
    run(engine, data, out, limit=2, max_new_tokens=5, overwrite=True)
    assert len(read_samples(out / "samples.jsonl")) == 2


def test_torn_last_line_is_redone(engine, tmp_path):
    data = write_jsonl(tmp_path / "toy.jsonl", toy_rows(3))
    out = tmp_path / "out"
    run(engine, data, out)
    path = out / "samples.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:2]) + lines[2][:30])  # killed mid-write
    assert len(read_samples(path)) == 2
    repair_tail(path)
    assert path.read_text() == "".join(lines[:2])
    assert run(engine, data, out)["prompts"] == 3
    assert len(read_samples(path)) == 3


def test_num_samples_pass_at_k_matches_samples(engine, tmp_path):
    data = write_jsonl(tmp_path / "toy.jsonl", toy_rows(5))
    summary = run(engine, data, tmp_path / "out", num_samples=4, temperature=1.0, batch_size=8)
    records = read_samples(tmp_path / "out" / "samples.jsonl")
    assert all(len(r["completions"]) == 4 for r in records)
    counts = [sum(r["correct"]) for r in records]
    for record in records:
        assert record["correct"] == [bool(x) for x in accuracy_reward([""] * 4, record["completions"],
                                                                      answer=[record["gold"]] * 4)]
        assert record["predictions"] == [extract_prediction(c) for c in record["completions"]]
    assert summary["pass_at_k"]["pass@1"] == pytest.approx(sum(c / 4 for c in counts) / 5)
    assert summary["pass_at_k"]["pass@4"] == pytest.approx(sum(pass_at_k(4, c, 4) for c in counts) / 5)
    assert summary["accuracy"] == pytest.approx(summary["pass_at_k"]["pass@1"])
    assert summary["ci95"] == pytest.approx(list(wilson_interval(sum(c / 4 for c in counts), 5)))
    with pytest.raises(ValueError, match="temperature"):
        run(engine, data, tmp_path / "greedy-n", num_samples=4)


def test_two_shards_and_merge_equal_unsharded(engine, tmp_path):
    data = write_jsonl(tmp_path / "toy.jsonl", toy_rows(7))
    # batch_size=1: shards batch different prompts together, and padding may move the last float bit
    whole = run(engine, data, tmp_path / "whole", batch_size=1, max_new_tokens=6)
    sharded = tmp_path / "sharded"
    for rank in (1, 0):
        part = run(engine, data, sharded, batch_size=1, max_new_tokens=6, shard_rank=rank, num_shards=2)
        assert part["shard"] == [rank, 2] and part["prompts"] == (4 if rank == 0 else 3)
    assert not (sharded / "summary.json").exists()
    assert {r["index"] for r in read_samples(sharded / "samples.rank0.jsonl")} == {0, 2, 4, 6}
    merged = run(engine, data, sharded, max_new_tokens=6, merge_only=True)
    by_index = {r["index"]: r for r in read_samples(tmp_path / "whole" / "samples.jsonl")}
    for name in ("samples.rank0.jsonl", "samples.rank1.jsonl"):
        for record in read_samples(sharded / name):
            assert record == by_index[record["index"]]
    assert merged == whole


def test_merge_reports_missing_shards(engine, tmp_path):
    data = write_jsonl(tmp_path / "toy.jsonl", toy_rows(4))
    run(engine, data, tmp_path / "out", shard_rank=0, num_shards=2)
    summary = run(engine, data, tmp_path / "out", merge_only=True)
    assert summary["prompts"] == 2 and summary["missing"] == 2


def test_shard_from_torchrun_environment(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.delenv("MASTER_ADDR", raising=False)  # no rendezvous: shard only, no process group
    assert resolve_shard() == (1, 3, False)
    assert resolve_shard(0, 2) == (0, 2, False)  # explicit flags win
    with pytest.raises(ValueError, match="shard_rank"):
        resolve_shard(2, 2)


def test_cli_writes_benchmark_dirs_and_combined_table(talky_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "toy.jsonl", toy_rows(3))
    out = tmp_path / "out"
    evaluate_module.main(["--model", str(talky_model_dir), "--data", str(data), "--question-field", "q",
                          "--answer-field", "a", "--output", str(out), "--max-new-tokens", "8", "--no-progress",
                          "--prompt", "plain"])
    assert len(read_samples(out / "toy" / "samples.jsonl")) == 3
    assert json.loads((out / "summary.json").read_text())[0]["prompt"] == "plain"
    assert "| toy | 3 |" in (out / "summary.md").read_text()


def test_benchmark_presets_load():
    for name in BENCHMARKS:
        examples, source = load_benchmark(name, limit=3)
        assert len(examples) == 3 and Path(source).exists()
        assert all(ex.question and ex.answer for ex in examples)
    gsm8k, _ = load_benchmark("gsm8k", limit=1)
    assert gsm8k[0].answer == "18"  # the number after ####, as training reads it


def test_unknown_benchmark_lists_presets(tmp_path):
    with pytest.raises(ValueError, match="gsm8k, math500, amc23, aime24, arithmetic"):
        evaluate(benchmark="gsm8k-typo", output_dir=tmp_path)


def _save_adapter(base_dir: Path, target: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(target)


def test_checkpoint_source_uses_hf_dir_beside_it(talky_model_dir, tmp_path):
    ckpt = tmp_path / "step000010.ckpt"
    _save_adapter(talky_model_dir, tmp_path / "step000010.hf")  # where callbacks.checkpoint.hf_dir_for puts it
    torch.save({"hyper_parameters": {"model_name_or_path": str(talky_model_dir), "quantization": None}}, ckpt)
    spec = resolve_model_spec(checkpoint=str(ckpt))
    assert spec.adapter == str(tmp_path / "step000010.hf") and spec.base == str(talky_model_dir)
    data = write_jsonl(tmp_path / "toy.jsonl", toy_rows(2))
    summary = evaluate(checkpoint=str(ckpt), data=str(data), question_field="q", answer_field="a",
                       output_dir=tmp_path / "out", **GEN)
    assert summary["model"] == str(ckpt) and summary["prompts"] == 2

    with pytest.raises(FileNotFoundError, match="no Hugging Face directory"):
        resolve_model_spec(checkpoint=str(tmp_path / "other.ckpt"))
    (tmp_path / "bare.hf").mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        resolve_model_spec(checkpoint=str(tmp_path / "bare.ckpt"))


def test_vllm_backend_says_what_is_missing(talky_model_dir):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None and torch.cuda.is_available():
        pytest.skip("vllm can run here")
    with pytest.raises(RuntimeError, match="vllm|CUDA"):
        load_backend(ModelSpec(str(talky_model_dir)), "vllm")


@pytest.mark.gpu
def test_vllm_greedy_answers_agree_with_transformers(tmp_path):
    """On GPU: greedy answers of vLLM and transformers agree on GSM8K (built-in SmolLM2-135M, float32)."""
    pytest.importorskip("vllm")
    common = {"benchmark": "gsm8k", "limit": 16, "max_new_tokens": 128, "dtype": "float32", "progress": False}
    hf = evaluate(output_dir=tmp_path / "hf", backend="transformers", **common)
    vl = evaluate(output_dir=tmp_path / "vllm", backend="vllm", **common)
    a = {r["index"]: r["predictions"][0] for r in read_samples(tmp_path / "hf" / "samples.jsonl")}
    b = {r["index"]: r["predictions"][0] for r in read_samples(tmp_path / "vllm" / "samples.jsonl")}
    agree = sum(a[i] == b[i] for i in a) / len(a)
    # float32 on both sides; a rare near-tie can still flip one greedy token and the rest of a completion
    assert agree >= 0.9, (a, b)
    assert abs(hf["accuracy"] - vl["accuracy"]) <= 0.1


def test_results_from_before_the_option_count_as_flexible(engine, tmp_path):
    """A results directory written before `answer_extraction` existed was scored the flexible way."""
    data = write_jsonl(tmp_path / "toy.jsonl", toy_rows(2))
    first = run(engine, data, tmp_path / "out", answer_extraction="flexible")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    del config["answer_extraction"]  # as an older version wrote it
    (tmp_path / "out" / "config.json").write_text(json.dumps(config))
    assert run(engine, data, tmp_path / "out", answer_extraction="flexible")["prompts"] == first["prompts"]
    with pytest.raises(ValueError, match="answer_extraction: 'flexible' there, 'boxed' now"):
        run(engine, data, tmp_path / "out", answer_extraction="boxed")


def test_conversational_data_file_is_rendered_as_it_is(engine, tmp_path):
    rows = [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"What is {i} + 1?"}],
             "solution": str(i + 1)} for i in range(3)]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    summary = evaluate(data=str(data), question_field="prompt", answer_field="solution", output_dir=tmp_path / "out",
                       backend=engine, **GEN)
    records = read_samples(tmp_path / "out" / "samples.jsonl")
    assert summary["prompts"] == 3 and [r["question"] for r in records] == [f"What is {i} + 1?" for i in range(3)]
    assert [r["gold"] for r in records] == ["1", "2", "3"]


def test_cli_answer_extraction_flag(talky_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "toy.jsonl", toy_rows(2))
    evaluate_module.main(["--model", str(talky_model_dir), "--data", str(data), "--question-field", "q",
                          "--answer-field", "a", "--output", str(tmp_path / "out"), "--max-new-tokens", "4",
                          "--no-progress", "--answer-extraction", "flexible"])
    assert json.loads((tmp_path / "out" / "summary.json").read_text())[0]["answer_extraction"] == "flexible"
    assert "| flexible |" in (tmp_path / "out" / "summary.md").read_text()
    with pytest.raises(SystemExit):
        evaluate_module.main(["--data", str(data), "--output", str(tmp_path / "x"), "--answer-extraction", "lenient"])


def test_chat_template_kwargs_reach_the_prompts_and_are_recorded(engine, tmp_path, monkeypatch, capsys):
    no_think = ("{% if enable_thinking is defined and not enable_thinking %}<|im_start|>system\n/no_think<|im_end|>\n"
                "{% endif %}")
    monkeypatch.setattr(engine.tokenizer, "chat_template", no_think + engine.tokenizer.chat_template)
    seen, real = [], engine.generate

    def spy(input_ids, **kwargs):
        seen.extend(engine.tokenizer.decode(ids) for ids in input_ids)
        return real(input_ids, **kwargs)

    monkeypatch.setattr(engine, "generate", spy)
    data = write_jsonl(tmp_path / "toy.jsonl", toy_rows(2))
    run(engine, data, tmp_path / "out", chat_template_kwargs={"enable_thinking": False})
    assert len(seen) == 2 and all(text.startswith("<|im_start|>system\n/no_think") for text in seen)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["chat_template_kwargs"] == {"enable_thinking": False}
    with pytest.raises(ValueError, match="chat_template_kwargs: \\{'enable_thinking': False\\} there, None now"):
        run(engine, data, tmp_path / "out")  # samples of another rendering are not mixed in
    with pytest.raises(SystemExit):
        evaluate_module.main(["--data", str(data), "--output", str(tmp_path / "x"), "--chat-template-kwargs", "[1]"])
    assert "must be a JSON object" in capsys.readouterr().err
