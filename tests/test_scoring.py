"""scoring.py: AngleScorer (early exit, padding invariance, reference equality), ranking, score cache."""

import copy
import json
import math
import sys

import pytest
import torch

from gainrl_pl.data.prompts import build_prompt, get_prompt_template
from gainrl_pl.schedules.rankings import angle_ranking, rank_scores
from gainrl_pl.scoring import (
    AngleScorer,
    PromptScore,
    ScoreCache,
    find_decoder_layers,
    ranking_summary,
    spearman,
)

QUESTIONS = [
    "What is 2 + 2?",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "How many apples are in 3 boxes of 12 apples each?",
    "What is 100 divided by 4, plus 7, times 3, minus the sum of 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15?",
]


def segments(tokenizer, questions=QUESTIONS, preset="paper"):
    return [build_prompt(tokenizer, q, get_prompt_template(preset)) for q in questions]


def reference_scores(model, segs, layer=-1, site="mlp_input", w_intra=1.0, w_inter=1.0):
    """The straightforward method: one full forward per prompt (no padding), the hidden states taken
    from an MLP pre-hook or `output_hidden_states`, and the L x L cosine matrix in float64."""
    out = []
    block = find_decoder_layers(model)[layer]
    for seg in segs:
        grabbed = []
        handle = block.mlp.register_forward_pre_hook(lambda m, args, sink=grabbed: sink.append(args[0]))
        try:
            with torch.no_grad():
                res = model(input_ids=torch.tensor([seg.input_ids]), output_hidden_states=True)
        finally:
            handle.remove()
        if site == "mlp_input":
            x = grabbed[0][0]
        else:
            n = len(find_decoder_layers(model))
            assert layer % n != n - 1, "the last hidden_states entry has the final norm applied"
            x = res.hidden_states[layer % n + 1][0]
        u = x.double() / x.double().norm(dim=-1, keepdim=True)
        cos = u @ u.T
        q, p = slice(*seg.question), slice(*seg.prefix)
        intra, inter = cos[q, q].mean().item(), cos[q, p].mean().item()
        out.append((w_intra * intra + w_inter * inter, intra, inter))
    return out


def assert_scores_close(got, ref, atol=1e-5):
    assert len(got) == len(ref)
    for g, (score, intra, inter) in zip(got, ref, strict=True):
        assert g.score == pytest.approx(score, abs=atol)
        assert g.intra == pytest.approx(intra, abs=atol) and g.inter == pytest.approx(inter, abs=atol)


class CallCounter:
    """Counts forward calls of modules (pre-hooks), to prove what ran and what did not."""

    def __init__(self, *modules):
        self.calls = 0
        self.handles = [m.register_forward_pre_hook(self._hook) for m in modules]

    def _hook(self, module, args):
        self.calls += 1

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("layer", [0, -1])
def test_early_exit_and_equality_with_full_forward(tiny_model, tiny_tokenizer, layer):
    segs = segments(tiny_tokenizer)
    layers = find_decoder_layers(tiny_model)
    later = [*layers[layer % len(layers) + 1:], tiny_model.model.norm, tiny_model.lm_head]
    counter = CallCounter(*later)
    scorer = AngleScorer(tiny_model, tiny_tokenizer, layer=layer, batch_size=3, w_inter=8.0, show_progress=False)
    got = scorer.score(segs)
    counter.remove()
    assert counter.calls == 0, "layers after the scoring layer, the final norm or the LM head ran"
    assert [g.index for g in got] == list(range(len(segs)))
    assert [g.num_tokens for g in got] == [s.num_tokens for s in segs]
    assert_scores_close(got, reference_scores(tiny_model, segs, layer=layer, w_inter=8.0))


def test_layer_output_site_matches_hidden_states(tiny_model, tiny_tokenizer):
    segs = segments(tiny_tokenizer)[:2]
    got = AngleScorer(tiny_model, tiny_tokenizer, layer=0, site="layer_output", show_progress=False).score(segs)
    assert_scores_close(got, reference_scores(tiny_model, segs, layer=0, site="layer_output"))


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("diagonal", [True, False])
def test_padding_invariance(tiny_model, tiny_tokenizer, side, diagonal):
    """A short prompt scores the same alone and in a batch padded to much longer prompts."""
    tok = copy.deepcopy(tiny_tokenizer)
    tok.padding_side = side
    long_q = " ".join(QUESTIONS[1:]) * 2
    segs = segments(tok, [QUESTIONS[0], long_q, QUESTIONS[1], long_q + " 7"])
    assert segs[1].num_tokens > 3 * segs[0].num_tokens // 2
    scorer = AngleScorer(tiny_model, tok, batch_size=8, intra_diagonal=diagonal, show_progress=False)
    batched = scorer.score(segs)
    for i, seg in enumerate(segs):
        alone = scorer.score([seg])[0]
        assert batched[i].score == pytest.approx(alone.score, abs=1e-5)
        assert batched[i].intra == pytest.approx(alone.intra, abs=1e-5)
        assert batched[i].inter == pytest.approx(alone.inter, abs=1e-5)


def test_restores_modes_and_keeps_order(tiny_model, tiny_tokenizer):
    tiny_model.train()
    tiny_model.model.layers[0].eval()  # a mixed state must come back exactly as it was
    before = {name: m.training for name, m in tiny_model.named_modules()}
    segs = segments(tiny_tokenizer)
    scorer = AngleScorer(tiny_model, tiny_tokenizer, batch_size=1, show_progress=False)
    one = scorer.score(segs)
    assert {name: m.training for name, m in tiny_model.named_modules()} == before
    scorer.batch_size = 16
    for a, b in zip(one, scorer.score(segs), strict=True):
        assert a.index == b.index and a.score == pytest.approx(b.score, abs=1e-5)


def test_bf16_model_gives_float_scores(tiny_model_dir, tiny_tokenizer, tiny_model):
    from gainrl_pl.models import load_model

    segs = segments(tiny_tokenizer)[:2]
    fp32 = AngleScorer(tiny_model, tiny_tokenizer, show_progress=False).score(segs)
    bf16 = AngleScorer(load_model(str(tiny_model_dir), dtype="bf16"), tiny_tokenizer,
                       show_progress=False).score(segs)
    for a, b in zip(fp32, bf16, strict=True):
        assert isinstance(b.score, float) and math.isfinite(b.score)
        assert b.score == pytest.approx(a.score, abs=0.05)


def test_peft_wrapped_model(tiny_model, tiny_tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    segs = segments(tiny_tokenizer)[:2]
    base = AngleScorer(tiny_model, tiny_tokenizer, show_progress=False).score(segs)
    cache = ScoreCache(tmp_path)
    base_key = cache.key(tiny_model, segs, layer=-1, site="mlp_input", w_intra=1, w_inter=1, intra_diagonal=True)
    peft_model = get_peft_model(tiny_model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"]))
    assert len(find_decoder_layers(peft_model)) == 2
    wrapped = AngleScorer(peft_model, tiny_tokenizer, show_progress=False).score(segs)
    for a, b in zip(base, wrapped, strict=True):  # LoRA B starts at zero: same function, same scores
        assert a.score == pytest.approx(b.score, abs=1e-6)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    trained = AngleScorer(peft_model, tiny_tokenizer, show_progress=False).score(segs)
    # the adapters are applied
    assert any(abs(a.score - b.score) > 1e-4 for a, b in zip(base, trained, strict=True))
    trained_key = cache.key(peft_model, segs, layer=-1, site="mlp_input", w_intra=1, w_inter=1,
                            intra_diagonal=True)
    assert trained_key != base_key


def test_config_errors(tiny_model, tiny_tokenizer):
    for layer in (2, -3):
        with pytest.raises(ValueError, match=r"layer=.* out of range .* 2 decoder layers \(allowed: -2\.\.1\)"):
            AngleScorer(tiny_model, tiny_tokenizer, layer=layer)
    with pytest.raises(ValueError, match="site='attention'.*allowed: mlp_input, layer_output"):
        AngleScorer(tiny_model, tiny_tokenizer, site="attention")
    with pytest.raises(ValueError, match="could not find the decoder layers of Linear"):
        AngleScorer(torch.nn.Linear(2, 2), tiny_tokenizer)
    with pytest.raises(TypeError, match="build_prompt"):
        AngleScorer(tiny_model, tiny_tokenizer, show_progress=False).score([[1, 2, 3]])


def test_cache_hit_runs_no_forward(tiny_model, tiny_tokenizer, tmp_path):
    segs = segments(tiny_tokenizer)
    items = [{"segments": s, "question_tokens": s.num_question_tokens} for s in segs]
    first = angle_ranking(tiny_model, tiny_tokenizer, items, w_inter=8.0, cache_dir=str(tmp_path), model_id="tiny")
    counter = CallCounter(tiny_model.model.embed_tokens, *find_decoder_layers(tiny_model))
    second = angle_ranking(tiny_model, tiny_tokenizer, items, w_inter=8.0, cache_dir=str(tmp_path), model_id="tiny")
    counter.remove()
    assert counter.calls == 0 and second == first  # identical, bit for bit
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and not any(name.endswith(".tmp") for name in files)
    cache = ScoreCache(tmp_path)
    key = cache.key(tiny_model, segs, layer=-1, site="mlp_input", w_intra=1.0, w_inter=8.0, intra_diagonal=True,
                    model_id="tiny")
    meta = json.loads((tmp_path / f"{key}.meta.json").read_text())
    assert meta["num_prompts"] == len(segs) and meta["w_inter"] == 8.0 and meta["model"] == "tiny"
    assert meta["summary"]["num_prompts"] == len(segs) and "spearman_score_question_length" in meta["summary"]

    def other(**kw):
        args = dict(layer=-1, site="mlp_input", w_intra=1.0, w_inter=8.0, intra_diagonal=True, model_id="tiny")
        return cache.key(tiny_model, kw.pop("prompts", segs), **{**args, **kw})

    variants = [other(w_inter=1.0), other(w_intra=0.5), other(layer=0), other(site="layer_output"),
                other(intra_diagonal=False), other(model_id="other"), other(prompts=segs[:3]),
                other(prompts=segments(tiny_tokenizer, preset="none"))]
    assert len({key, *variants}) == len(variants) + 1
    with torch.no_grad():
        tiny_model.model.layers[0].mlp.up_proj.weight.mul_(1.01)  # a "trained" policy
    assert other() != key


def test_cache_ignores_broken_files(tiny_model, tiny_tokenizer, tmp_path):
    segs = segments(tiny_tokenizer)[:2]
    cache = ScoreCache(tmp_path)
    key = cache.key(tiny_model, segs, layer=-1, site="mlp_input", w_intra=1, w_inter=1, intra_diagonal=True)
    assert cache.load(key) is None
    cache.save(key, [PromptScore(0, 0.5, 0.25, 0.25, 10), PromptScore(1, 0.1, 0.05, 0.05, 12)], {})
    assert cache.load(key)[1].score == 0.1
    (tmp_path / f"{key}.jsonl").write_text('{"index": 0, "score": 0.5}\nnot json\n')
    with pytest.warns(UserWarning, match="unreadable score cache"):
        assert cache.load(key) is None


def test_rank_scores():
    nan = float("nan")
    scores = [PromptScore(i, s, 0.0, 0.0, 5) for i, s in enumerate([0.2, nan, 0.9, 0.2, 0.5])]
    assert rank_scores(scores) == [2, 4, 0, 3, 1]  # descending, ties by index, NaN last


def test_ranking_summary_and_spearman(monkeypatch):
    scores = [PromptScore(i, s, s / 2, s / 2, 5) for i, s in enumerate([0.3, 0.1, 0.4, 0.2, 0.2])]
    lengths = [30, 10, 50, 25, 20]
    summary = ranking_summary(scores, lengths)
    assert summary["num_prompts"] == 5 and summary["score_min"] == 0.1 and summary["score_max"] == 0.4
    assert summary["score_mean"] == pytest.approx(0.24)
    assert summary["score_sd"] == pytest.approx(torch.tensor([0.3, 0.1, 0.4, 0.2, 0.2]).double().std().item())
    with_scipy = summary["spearman_score_question_length"]
    monkeypatch.setitem(sys.modules, "scipy.stats", None)  # the fallback rank correlation (ties averaged)
    assert spearman([s.score for s in scores], lengths) == pytest.approx(with_scipy, abs=1e-12)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1], [1, 2]) is None
    json.dumps(summary)  # goes into the cache's meta file as is


@pytest.mark.slow
def test_smollm2_gsm8k_scores():
    from gainrl_pl.models import load_model, load_tokenizer

    with open("/work/shared/data/gsm8k/train.jsonl", encoding="utf-8") as fh:
        questions = [json.loads(next(fh))["question"] for _ in range(8)]
    tokenizer = load_tokenizer(None)
    model = load_model(None)
    segs = segments(tokenizer, questions)
    counter = CallCounter(model.lm_head, model.model.norm)
    scores = AngleScorer(model, tokenizer, batch_size=4, show_progress=False).score(segs)
    counter.remove()
    assert counter.calls == 0
    for s in scores:
        assert all(math.isfinite(v) for v in (s.score, s.intra, s.inter))
        # Last-layer MLP inputs are strongly anisotropic (spec section 2: ~0.73 intra, ~0.66 inter).
        assert 0.3 < s.intra <= 1.0 and 0.2 < s.inter < 1.0
    assert len({round(s.score, 6) for s in scores}) > 1
    assert_scores_close(scores[:2], reference_scores(model, segs[:2]), atol=1e-4)
