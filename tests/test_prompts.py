"""prompts.py: presets, rendering, and prefix/question/suffix segments from the tokenizer's offsets."""

import copy

import pytest

from gainrl_pl.data.prompts import (
    PROMPT_PRESETS,
    PromptTemplate,
    PromptTooLongError,
    build_chat_prompt,
    build_prompt,
    get_prompt_template,
)

QUESTION = "Natalia sold clips to 48 of her friends in April. How many clips did she sell?"
GENERATION_PROMPT = "<|im_start|>assistant\n"


def _parts(tokenizer, seg):
    ids = seg.input_ids
    return [tokenizer.decode(ids[slice(*r)]) for r in (seg.prefix, seg.question, seg.suffix)]


def test_presets_and_lookup():
    assert set(PROMPT_PRESETS) == {"paper", "plain", "none", "code"}
    paper = get_prompt_template("paper")
    assert "\\boxed{}" in paper.system_prompt and "step by step" in paper.system_prompt
    assert paper.few_shot[0][0] == "What is 2+2?" and "\\boxed{4}" in paper.few_shot[0][1]
    paper.few_shot.append(("x", "y"))  # a copy: the preset itself is unchanged
    assert len(PROMPT_PRESETS["paper"].few_shot) == 1
    assert get_prompt_template("plain").messages("Q?") == [
        {"role": "user", "content": "Q? Put the final answer in \\boxed{}."}]
    assert get_prompt_template("none").messages("Q?") == [{"role": "user", "content": "Q?"}]
    custom = PromptTemplate(system_prompt="S")
    assert get_prompt_template(custom) is custom
    assert get_prompt_template({"few_shot": [["a", "b"]]}).few_shot == [("a", "b")]
    with pytest.raises(ValueError, match="allowed: paper, plain, none"):
        get_prompt_template("r1")


def test_template_validation():
    with pytest.raises(ValueError, match="exactly once"):
        PromptTemplate(question_format="no placeholder")
    with pytest.raises(ValueError, match="pairs"):
        PromptTemplate(few_shot=[("only user",)])


@pytest.mark.parametrize("preset", ["paper", "plain", "none"])
def test_segments_partition_the_prompt(tiny_tokenizer, preset):
    template = get_prompt_template(preset)
    seg = build_prompt(tiny_tokenizer, QUESTION, template)
    assert seg.text == tiny_tokenizer.apply_chat_template(template.messages(QUESTION), tokenize=False,
                                                          add_generation_prompt=True)
    assert seg.input_ids == tiny_tokenizer(seg.text, add_special_tokens=False)["input_ids"]
    assert seg.prefix[0] == 0 and seg.prefix[1] == seg.question[0] and seg.question[1] == seg.suffix[0]
    assert seg.suffix[1] == seg.num_tokens and seg.num_question_tokens > 0
    prefix, question, suffix = _parts(tiny_tokenizer, seg)
    assert question.strip() == QUESTION
    assert prefix.endswith("<|im_start|>user\n")
    assert suffix.endswith(GENERATION_PROMPT) and suffix.startswith(" Put" if preset == "plain" else "<|im_end|>")
    assert seg.text[slice(*seg.question_chars)] == QUESTION
    if preset == "paper":
        assert template.system_prompt in prefix and "What is 2+2?" in prefix and "\\boxed{4}" in prefix


def test_question_also_in_few_shot_is_found_in_last_turn(tiny_tokenizer):
    seg = build_prompt(tiny_tokenizer, "  What is 2+2?\n", get_prompt_template("paper"))
    prefix, question, _ = _parts(tiny_tokenizer, seg)
    assert question == "What is 2+2?"  # stripped, and not the few-shot copy
    assert prefix.count("What is 2+2?") == 1


def test_braces_in_question(tiny_tokenizer):
    q = "Is {x} in \\boxed{} or {question}?"
    seg = build_prompt(tiny_tokenizer, q, get_prompt_template("plain"))
    assert _parts(tiny_tokenizer, seg)[1] == q


def test_empty_question(tiny_tokenizer):
    for q in ["", "   \n"]:
        with pytest.raises(ValueError, match="question=.*empty"):
            build_prompt(tiny_tokenizer, q, get_prompt_template("paper"))


def test_too_long(tiny_tokenizer):
    seg = build_prompt(tiny_tokenizer, QUESTION, get_prompt_template("paper"))
    assert build_prompt(tiny_tokenizer, QUESTION, get_prompt_template("paper"), max_length=seg.num_tokens) == seg
    with pytest.raises(PromptTooLongError) as info:
        build_prompt(tiny_tokenizer, QUESTION, get_prompt_template("paper"), max_length=seg.num_tokens - 1)
    assert info.value.length == seg.num_tokens and isinstance(info.value, ValueError)


def _with_template(tokenizer, chat_template):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = chat_template
    return tok


def test_default_system_prompt_goes_to_prefix(tiny_tokenizer):
    """Like SmolLM2's template: a default system message when none is given."""
    tok = _with_template(tiny_tokenizer, (
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "{% endif %}" + tiny_tokenizer.chat_template))
    seg = build_prompt(tok, QUESTION, get_prompt_template("none"))
    prefix, question, suffix = _parts(tok, seg)
    assert "You are a helpful assistant." in prefix and question == QUESTION and suffix.endswith(GENERATION_PROMPT)


def test_template_that_trims_content(tiny_tokenizer):
    tok = _with_template(tiny_tokenizer, tiny_tokenizer.chat_template.replace("message['content']",
                                                                               "message['content'] | trim"))
    seg = build_prompt(tok, QUESTION, get_prompt_template("paper"))
    assert _parts(tok, seg)[1] == QUESTION


def test_template_that_rewrites_content_is_a_clear_error(tiny_tokenizer):
    tok = _with_template(tiny_tokenizer, tiny_tokenizer.chat_template.replace("message['content']",
                                                                               "message['content'] | upper"))
    with pytest.raises(ValueError, match="could not locate the question .* chat template"):
        build_prompt(tok, QUESTION, get_prompt_template("none"))


# ----------------------------------------------------------------------------------------------- conversations
@pytest.mark.parametrize("preset", ["paper", "none"])
def test_a_conversation_segments_as_the_same_prompt_built_from_a_template(tiny_tokenizer, preset):
    """TRL's conversational rows: the messages a preset would render give the very same prompt and segments."""
    template = get_prompt_template(preset)
    assert build_chat_prompt(tiny_tokenizer, template.messages(QUESTION)) == build_prompt(tiny_tokenizer, QUESTION,
                                                                                          template)


def test_a_conversation_question_is_its_whole_last_user_turn(tiny_tokenizer):
    # with the `plain` preset our template knows where the question ends inside the user turn; in a
    # conversation nothing says so, and the whole turn (instruction included) is the question segment
    messages = get_prompt_template("plain").messages(QUESTION)
    seg = build_chat_prompt(tiny_tokenizer, messages)
    assert _parts(tiny_tokenizer, seg)[1].strip() == messages[-1]["content"]
    assert seg.text == build_prompt(tiny_tokenizer, QUESTION, get_prompt_template("plain")).text


def test_conversation_question_is_the_last_user_turn(tiny_tokenizer):
    messages = [{"role": "system", "content": "Solve it."},
                {"role": "user", "content": QUESTION},  # the same text in an earlier turn: a few-shot copy
                {"role": "assistant", "content": "She sold 72. \\boxed{72}"},
                {"role": "user", "content": "  " + QUESTION + "\n"}]
    seg = build_chat_prompt(tiny_tokenizer, messages)
    assert seg.text == tiny_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prefix, question, suffix = _parts(tiny_tokenizer, seg)
    assert question.strip() == QUESTION and seg.text[slice(*seg.question_chars)] == QUESTION
    assert prefix.count(QUESTION) == 1 and "Solve it." in prefix and "boxed{72}" in prefix  # earlier turns
    assert prefix.rstrip(" ").endswith("<|im_start|>user\n") and suffix.endswith(GENERATION_PROMPT)
    assert seg.num_tokens == len(tiny_tokenizer(seg.text, add_special_tokens=False)["input_ids"])
    with pytest.raises(PromptTooLongError):
        build_chat_prompt(tiny_tokenizer, messages, max_length=seg.num_tokens - 1)


@pytest.mark.parametrize("messages, match", [
    ([], "non-empty list"),
    ("What is 2+2?", "non-empty list"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "must end with the user turn"),
    ([{"role": "user"}], "message 0 .*role"),
    ([{"role": "user", "content": [{"type": "text", "text": "q"}]}], "message 0"),
    ([{"role": "user", "content": "   "}], "empty"),
])
def test_malformed_conversations_are_clear_errors(tiny_tokenizer, messages, match):
    with pytest.raises(ValueError, match=match):
        build_chat_prompt(tiny_tokenizer, messages)


@pytest.mark.slow
def test_smollm2_segments():
    from gainrl_pl.models import load_tokenizer

    tok = load_tokenizer(None)
    seg = build_prompt(tok, QUESTION, get_prompt_template("none"))
    prefix, question, suffix = _parts(tok, seg)
    assert "SmolLM" in prefix  # the template's own default system prompt
    assert question.strip() == QUESTION and suffix.endswith(GENERATION_PROMPT)
    seg = build_prompt(tok, QUESTION, get_prompt_template("paper"))
    prefix, question, suffix = _parts(tok, seg)
    assert "SmolLM" not in prefix and "step by step" in prefix and question.strip() == QUESTION


# Qwen3-style: a variable of the template switches the reasoning mode
NO_THINK = ("{% if enable_thinking is defined and not enable_thinking %}<|im_start|>system\n/no_think<|im_end|>\n"
            "{% endif %}")


def test_chat_template_kwargs_reach_the_template(tiny_tokenizer):
    tok = _with_template(tiny_tokenizer, NO_THINK + tiny_tokenizer.chat_template)
    template = get_prompt_template("none")
    default = build_prompt(tok, QUESTION, template)
    off = build_prompt(tok, QUESTION, template, chat_template_kwargs={"enable_thinking": False})
    assert "/no_think" not in default.text and off.text.startswith("<|im_start|>system\n/no_think")
    prefix, question, _ = _parts(tok, off)
    assert "/no_think" in prefix and question == QUESTION  # the segments follow the rendered text
    assert build_chat_prompt(tok, template.messages(QUESTION), chat_template_kwargs={"enable_thinking": False}) == off
