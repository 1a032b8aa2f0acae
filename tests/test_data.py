"""Data loading, presets and bad-row handling (gainrl_pl.data.examples): every shipped set, every format, bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gainrl_pl.data import (
    DATASET_PRESETS,
    REPO_ROOT,
    DataError,
    DatasetPreset,
    build_examples,
    load_rows,
    parse_gsm8k_answer,
    resolve_data_path,
)

SHARED = REPO_ROOT.parent / "shared" / "data"
SHARED_SETS = [  # (file, preset, rows kept with the preset alone)
    ("gsm8k/train.jsonl", "gsm8k", 7473),
    ("gsm8k/test.jsonl", "gsm8k", 1319),
    ("math/train.jsonl", "math", 7498),  # 2 problems have no final answer: skipped and counted
    ("math/test.jsonl", "math", 500),
    ("math/train.json", "math", 7470),  # 4 problems have no final answer
    ("math/test500.json", "math", 500),
    ("eval/aime24.json", "aime", 30),
    ("eval/amc.json", "amc", 83),
]
ROWS = [{"question": "What is 2 + 2?", "answer": "4", "level": 1},
        {"question": "What is 3 times 3?", "answer": "9", "level": 2}]


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not present")
@pytest.mark.parametrize("name,preset,kept", SHARED_SETS)
def test_shared_sets_load_with_preset_alone(name, preset, kept):
    rows = load_rows(resolve_data_path(f"../shared/data/{name}"))
    examples, report = build_examples(rows, preset)
    assert len(examples) == kept and report.kept == kept
    assert report.total == len(rows) == kept + sum(report.skipped.values())
    assert all(ex.question.strip() and ex.answer.strip() for ex in examples)
    json.dumps([ex.columns for ex in examples])  # columns stay JSON-able


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not present")
def test_shared_set_details():
    gsm, _ = build_examples(load_rows(str(SHARED / "gsm8k/train.jsonl")), "gsm8k")
    assert gsm[0].answer == "72" and gsm[0].columns == {}
    amc, _ = build_examples(load_rows(str(SHARED / "eval/amc.json")), "amc")
    assert amc[0].answer == "142"  # JSON number 142.0 -> "142"
    assert all("." not in ex.answer for ex in amc)
    math_rows = load_rows(str(SHARED / "math/train.jsonl"))
    _, report = build_examples(math_rows, "math")
    assert report.skipped == {"answer_empty": 2}
    with pytest.raises(DataError, match="on_bad_row='skip'"):  # an explicit raise overrides the preset
        build_examples(math_rows, "math", on_bad_row="raise")


def test_gsm8k_answer_parsing():
    assert parse_gsm8k_answer("She sold 1000 + 234 clips.\n#### 1,234") == "1234"
    assert parse_gsm8k_answer("a #### 1 #### -5 ") == "-5"
    assert parse_gsm8k_answer("no marker") == ""
    examples, report = build_examples([{"question": "q", "answer": "work\n#### 1,234"},
                                       {"question": "q2", "answer": "no marker"}], "gsm8k", on_bad_row="skip")
    assert [ex.answer for ex in examples] == ["1234"] and report.skipped == {"answer_unparseable": 1}


# --------------------------------------------------------------------------------------- formats
def _write(fmt: str, tmp_path: Path) -> str:
    if fmt == "json":
        (tmp_path / "d.json").write_text(json.dumps(ROWS), encoding="utf-8")
        return str(tmp_path / "d.json")
    if fmt == "jsonl":
        (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS) + "\n", encoding="utf-8")
        return str(tmp_path / "d.jsonl")
    if fmt == "csv":
        (tmp_path / "d.csv").write_text("question,answer,level\nWhat is 2 + 2?,4,1\nWhat is 3 times 3?,9,2\n")
        return str(tmp_path / "d.csv")
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
        return str(tmp_path / "d.parquet")
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "hf"))
    return str(tmp_path / "hf")


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv", "parquet", "hf"])
def test_each_format_loads(fmt, tmp_path):
    examples, report = build_examples(load_rows(_write(fmt, tmp_path)), "generic")
    assert [(ex.index, ex.question, ex.answer) for ex in examples] == [
        (0, "What is 2 + 2?", "4"), (1, "What is 3 times 3?", "9")]
    assert str(examples[1].columns["level"]) == "2" and report.skipped == {}


def test_hf_dataset_dict_needs_split(tmp_path):
    import datasets

    data = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                                 "test": datasets.Dataset.from_list(ROWS[:1])})
    data.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match="split"):
        load_rows(str(tmp_path / "dd"))
    assert len(load_rows(str(tmp_path / "dd"), split="test")) == 1


def test_fmt_overrides_extension_and_json_named_jsonl(tmp_path):
    path = tmp_path / "rows.txt"
    path.write_text("\n".join(json.dumps(r) for r in ROWS))
    assert load_rows(str(path), fmt="jsonl") == ROWS
    with pytest.raises(DataError, match="fmt="):
        load_rows(str(path))
    (tmp_path / "lines.json").write_text(path.read_text())  # JSONL saved as .json: read as JSONL
    assert load_rows(str(tmp_path / "lines.json")) == ROWS


# --------------------------------------------------------------------------------------- bad files
def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_rows(str(tmp_path / "nope.jsonl"))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        resolve_data_path("data/nope.jsonl")


def test_malformed_jsonl_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + '{"question": "broken", "answer": \n')
    with pytest.raises(DataError, match=r"line 3 .*broken"):
        load_rows(str(path))
    path.write_text('[1, 2]\n')
    with pytest.raises(DataError, match="line 1 is a JSON list"):
        load_rows(str(path))


def test_json_not_an_array_of_objects(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"data": ROWS}))
    with pytest.raises(DataError, match="not an array"):
        load_rows(str(path))
    path.write_text(json.dumps([ROWS[0], "oops"]))
    with pytest.raises(DataError, match="element 1"):
        load_rows(str(path))


@pytest.mark.parametrize("name", ["bad.jsonl", "bad.csv", "bad.json"])
def test_non_utf8_file_is_a_clear_error(name, tmp_path):
    path = tmp_path / name
    if name.endswith(".csv"):
        body = "question,answer\nok,1\nCaf\xe9 price?,2\n".encode("latin-1")
    elif name.endswith(".jsonl"):
        body = (json.dumps(ROWS[0]) + "\n" + '{"question": "Caf\xe9?", "answer": "1"}\n').encode("latin-1")
    else:
        body = '[{"question": "Caf\xe9?", "answer": "1"}]'.encode("latin-1")
    path.write_bytes(body)
    expected_line = 1 if name.endswith(".json") else (2 if name.endswith(".jsonl") else 3)
    with pytest.raises(DataError, match=rf"line {expected_line} \(byte offset \d+\) is not valid UTF-8.*UTF-8"):
        load_rows(str(path))


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffquestion,answer\nq,1\n".encode())
    assert load_rows(str(path)) == [{"question": "q", "answer": "1"}]


def test_csv_missing_answer_column_names_row_and_field(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("question,solution\nWhat is 1 + 1?,2\n")
    with pytest.raises(DataError) as info:
        build_examples(load_rows(str(path)), "generic")
    assert info.value.row == 0 and info.value.field == "answer"
    assert "row 0" in str(info.value) and "'answer'" in str(info.value) and "answer_field" in str(info.value)
    # the fix the message names works
    examples, _ = build_examples(load_rows(str(path)), {"answer_field": "solution"})
    assert examples[0].answer == "2"


def test_csv_short_row_names_the_row(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("question,answer\nq0,1\nq1\n")
    with pytest.raises(DataError, match=r"row 1 \(0-based\).*'answer'"):
        build_examples(load_rows(str(path)), "generic")


# --------------------------------------------------------------------------------------- bad rows
BAD_ROWS = [
    {"question": "fine", "answer": "1"},
    {"answer": "1"},                              # 1 missing question field
    {"question": "q"},                            # 2 missing answer field
    {"question": None, "answer": "1"},            # 3
    {"question": "   \n\u200b", "answer": "1"},   # 4 only whitespace / invisible
    {"question": 12, "answer": "1"},              # 5
    {"question": "q", "answer": ""},              # 6
    {"question": "q", "answer": None},            # 7
    {"question": "q", "answer": float("nan")},    # 8
    "not a dict",                                 # 9
    {"question": "x" * 50, "answer": "1"},        # 10 too long for max_question_chars=40
    {"question": "q\ud800", "answer": "1"},       # 11 lone surrogate (valid JSON, breaks tokenizers)
    {"question": " also fine ", "answer": 7},
]


def test_skip_mode_counts_by_reason():
    examples, report = build_examples(BAD_ROWS, "generic", on_bad_row="skip", max_question_chars=40)
    assert [(ex.index, ex.question, ex.answer) for ex in examples] == [(0, "fine", "1"), (12, "also fine", "7")]
    assert report.skipped == {"missing_question_field": 1, "missing_answer_field": 1, "question_not_text": 2,
                              "question_empty": 1, "answer_empty": 1, "answer_not_text": 2, "not_an_object": 1,
                              "question_too_long": 1, "question_invalid_unicode": 1}
    assert report.first_rows["question_not_text"] == [3, 5]
    summary = report.as_dict()
    assert summary["bad_rows"] == 11 and json.dumps(summary)


@pytest.mark.parametrize("index", range(1, 10))
def test_raise_mode_names_row_field_value_and_fix(index):
    with pytest.raises(DataError) as info:
        build_examples([BAD_ROWS[0], BAD_ROWS[index]], "generic")
    message = str(info.value)
    assert info.value.row == 1 and "row 1" in message and "on_bad_row='skip'" in message


def test_too_long_is_skipped_even_in_raise_mode():
    examples, report = build_examples([BAD_ROWS[0], BAD_ROWS[10]], "generic", max_question_chars=40)
    assert len(examples) == 1 and report.skipped == {"question_too_long": 1}


def test_value_in_message_is_truncated():
    with pytest.raises(DataError) as info:
        build_examples([{"question": 10**5000, "answer": "1"}], "generic")
    assert len(str(info.value)) < 400


def test_presets_and_extra_fields():
    assert set(DATASET_PRESETS) >= {"gsm8k", "math", "aime", "amc", "arithmetic", "generic"}
    preset = DatasetPreset("problem", "answer", "latex", extra_fields=("level",))
    examples, _ = build_examples([{"problem": " x ", "answer": " \\frac12 ", "level": 3, "junk": 1}], preset)
    assert (examples[0].question, examples[0].answer, examples[0].columns) == ("x", "\\frac12", {"level": 3})
    with pytest.raises(ValueError, match="answer_parser"):
        DatasetPreset(answer_parser="nope")
    with pytest.raises(ValueError, match="unknown"):
        build_examples([], "nope")


def test_resolve_data_path_from_any_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Path(resolve_data_path("data/arithmetic/train.jsonl")) == REPO_ROOT / "data/arithmetic/train.jsonl"
    (tmp_path / "data" / "arithmetic").mkdir(parents=True)
    (tmp_path / "data" / "arithmetic" / "train.jsonl").write_text("")
    assert resolve_data_path("data/arithmetic/train.jsonl") == str(tmp_path / "data/arithmetic/train.jsonl")
    assert resolve_data_path("openai/gsm8k") == "openai/gsm8k"  # not a path: left for load_rows (hub)
    assert resolve_data_path(os.fspath(tmp_path)) == str(tmp_path)


def test_not_a_saved_dataset_directory(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps(ROWS[0]))
    with pytest.raises(DataError, match="train.jsonl"):
        load_rows(str(tmp_path))


# --------------------------------------------------------------------------------------- property test
_cell = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(4000, 12000).map(lambda d: 7 * 10**d),
                  st.floats(allow_nan=True), st.text(),
                  st.text(alphabet=st.characters(codec="utf-8"), min_size=0, max_size=5),
                  st.text(alphabet=st.characters(categories=["Zs", "Cc", "Cf", "Cs", "Mn"])),
                  st.builds(lambda n, c: c * n, st.integers(0, 200_000), st.sampled_from("x \u200b\U0001f600")),
                  st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
_row = st.one_of(st.dictionaries(st.sampled_from(["question", "answer", "problem", "other", ""]), _cell, max_size=4),
                 st.dictionaries(st.one_of(st.integers(), st.text(max_size=5)), _cell, max_size=3),
                 _cell)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(rows=st.lists(_row, max_size=6), preset=st.sampled_from(sorted(DATASET_PRESETS)),
       mode=st.sampled_from(["raise", "skip"]))
def test_build_examples_never_crashes_or_yields_empty(rows, preset, mode):
    try:
        examples, report = build_examples(rows, preset, on_bad_row=mode)
    except DataError as err:
        assert mode == "raise" and err.row is not None and len(str(err)) < 1000
        return
    assert report.kept == len(examples) and report.total == len(rows)
    for ex in examples:
        assert isinstance(ex.question, str) and ex.question.strip()
        assert any(ch.isprintable() and not ch.isspace() for ch in ex.question)  # something visible
        assert isinstance(ex.answer, str) and ex.answer.strip()
        ex.question.encode("utf-8")
        json.dumps(ex.columns)


# --------------------------------------------------------------------------------------- TRL's conversational rows
CHAT_ROWS = [
    {"prompt": [{"role": "system", "content": "Reason, then box the answer."},
                {"role": "user", "content": " What is 2 + 2? "}], "solution": "\\boxed{4}", "level": 1},
    {"prompt": [{"role": "user", "content": "What is 3 times 3?"}], "solution": "9", "level": 2},
]


def test_conversational_rows_are_accepted_with_their_columns():
    examples, report = build_examples(CHAT_ROWS, "trl")
    assert report.kept == 2 and DATASET_PRESETS["trl"].question_field == "prompt"
    first = examples[0]
    assert first.question == "What is 2 + 2?"  # the last user turn, stripped
    assert first.messages == CHAT_ROWS[0]["prompt"]  # kept as given, rendered as they are
    assert first.answer == "\\boxed{4}"
    # the answer column keeps its own name (TRL's reward functions read `solution`), the others stay as they are
    assert first.columns == {"solution": "\\boxed{4}", "level": 1}
    assert examples[1].messages == CHAT_ROWS[1]["prompt"] and examples[1].question == "What is 3 times 3?"
    text_examples, _ = build_examples(ROWS, "generic")
    assert all(ex.messages is None for ex in text_examples)
    assert "answer" not in text_examples[0].columns  # an `answer` column is the parsed gold, added by the callers


@pytest.mark.parametrize("prompt", [
    [],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],  # does not end with the question
    [{"role": "user"}],
    [{"role": "user", "content": None}],
    ["What is 2 + 2?"],
])
def test_malformed_conversations_are_skipped_and_counted_or_named(prompt):
    rows = [CHAT_ROWS[1], {"prompt": prompt, "solution": "1"}]
    examples, report = build_examples(rows, "trl", on_bad_row="skip")
    assert len(examples) == 1 and report.skipped == {"question_messages_malformed": 1}
    with pytest.raises(DataError, match=r"row 1 .*question messages malformed.*'prompt'.*ending with the user turn"):
        build_examples(rows, "trl")


def test_blank_or_invalid_last_turn_is_reported_like_a_text_question():
    rows = [{"prompt": [{"role": "user", "content": " \u200b "}], "solution": "1"},
            {"prompt": [{"role": "system", "content": "x\ud800"}, {"role": "user", "content": "q"}], "solution": "1"}]
    _, report = build_examples(rows, "trl", on_bad_row="skip")
    assert report.skipped == {"question_empty": 1, "question_invalid_unicode": 1}


def test_datamodule_renders_conversations_and_carries_their_messages(tiny_model_dir, tmp_path):
    from gainrl_pl.datamodules import GainRLDataModule, ScheduleSettings

    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in CHAT_ROWS))
    dm = GainRLDataModule(train_data=str(path), preset="trl", prompt="paper", tokenizer=str(tiny_model_dir),
                          prompts_per_step=2, schedule=ScheduleSettings(name="uniform", subset_size=2))
    dm.setup("fit")
    assert dm.summary["train"]["conversational"] is True
    item = dm.train_set[0]
    seg = item["segments"]
    tok = dm.tokenizer
    assert item["prompt"] == tok.apply_chat_template(CHAT_ROWS[0]["prompt"], tokenize=False,
                                                     add_generation_prompt=True)
    assert "2+2" not in item["prompt"]  # the paper preset's worked example is not added to a conversation
    assert tok.decode(seg.input_ids[slice(*seg.question)]).strip() == "What is 2 + 2?"
    assert "Reason, then box the answer." in tok.decode(seg.input_ids[slice(*seg.prefix)])
    batch = dm.collate(dm._with_positions(dm.train_set))
    assert batch["prompt_messages"] == [r["prompt"] for r in CHAT_ROWS] and batch["conversational"] == [True, True]
    assert batch["columns"]["solution"] == ["\\boxed{4}", "9"] and batch["columns"]["answer"] == ["\\boxed{4}", "9"]

    # a text dataset: the messages the preset rendered, flagged as not conversational
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    dm = GainRLDataModule(train_data=str(text), preset="generic", prompt="none", tokenizer=str(tiny_model_dir),
                          prompts_per_step=2, schedule=ScheduleSettings(name="uniform", subset_size=2))
    dm.setup("fit")
    batch = dm.collate(dm._with_positions(dm.train_set))
    assert batch["prompt_messages"][0] == [{"role": "user", "content": "What is 2 + 2?"}]
    assert batch["conversational"] == [False, False] and dm.summary["train"]["conversational"] is False


def test_a_dataset_mixing_text_and_chat_prompts_is_refused(tiny_model_dir, tmp_path):
    from gainrl_pl.datamodules import GainRLDataModule, ScheduleSettings

    path = tmp_path / "mixed.jsonl"
    rows = [CHAT_ROWS[1], {"prompt": "What is 1 + 1?", "solution": "2"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = GainRLDataModule(train_data=str(path), preset="trl", tokenizer=str(tiny_model_dir),
                          prompts_per_step=2, schedule=ScheduleSettings(name="uniform", subset_size=2))
    with pytest.raises(DataError, match="row 0 holds chat messages but row 1 a text question"):
        dm.setup("fit")


def test_datamodule_chat_template_kwargs_shape_train_and_val_prompts(tiny_model_dir, tmp_path):
    from gainrl_pl.datamodules import GainRLDataModule, ScheduleSettings

    from gainrl_pl.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    tok.chat_template = ("{% if enable_thinking is defined and not enable_thinking %}<|im_start|>system\n/no_think"
                         "<|im_end|>\n{% endif %}" + tok.chat_template)
    tok.save_pretrained(tmp_path / "tok")
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps(r) + "\n" for r in CHAT_ROWS))
    for path, preset in ((text, "generic"), (chat, "trl")):
        settings = dict(train_data=str(path), val_data=str(path), preset=preset, prompt="none",
                        tokenizer=str(tmp_path / "tok"), prompts_per_step=2,
                        schedule=ScheduleSettings(name="uniform", subset_size=2))
        dm = GainRLDataModule(**settings, chat_template_kwargs={"enable_thinking": False})
        dm.setup("fit")
        assert all(item["prompt"].startswith("<|im_start|>system\n/no_think") for item in dm.train_set + dm.val_set)
        dm = GainRLDataModule(**settings)
        dm.setup("fit")
        assert not any("/no_think" in item["prompt"] for item in dm.train_set + dm.val_set)
