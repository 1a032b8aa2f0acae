import pytest
import torch

from gainrl_pl.models import load_model, load_tokenizer, parse_dtype, resolve_model_source


def test_tiny_model_loads_in_train_mode_with_chat_template(tiny_model_dir):
    model = load_model(str(tiny_model_dir))
    tok = load_tokenizer(str(tiny_model_dir))
    assert model.training, "HF returns eval mode; we must hand back train mode"
    assert tok.padding_side == "left" and tok.pad_token is not None
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    ids = tok(text, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 4 or out[0, -1] == tok.eos_token_id


def test_dtype_parsing():
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("float32") is torch.float32
    with pytest.raises(ValueError, match="dtype='int3'"):
        parse_dtype("int3")


def test_missing_local_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an existing path"):
        resolve_model_source(str(tmp_path / "nope" / "deeper"))


def test_hub_id_is_not_treated_as_local():
    src = resolve_model_source("Qwen/Qwen2.5-0.5B-Instruct")
    assert not src.is_local and src.path == "Qwen/Qwen2.5-0.5B-Instruct"


@pytest.mark.slow
def test_builtin_model_converts_and_reloads():
    model = load_model(None)
    tok = load_tokenizer(None)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert not hasattr(model.config, "quantization_config")
    assert "<|im_start|>" in tok.chat_template


def test_checkpoint_weight_keys_and_the_strict_check():
    from gainrl_pl.models import check_checkpoint_weight_keys, checkpoint_weight_keys

    keys = ["policy.a.lora_A", "policy.a.weight", "ref_model.a.weight"]
    assert checkpoint_weight_keys(keys, {"policy.a.lora_A"}, lora=True) == {"policy.a.lora_A"}
    assert checkpoint_weight_keys(keys, set(), lora=False) == {"policy.a.lora_A", "policy.a.weight"}
    assert checkpoint_weight_keys(keys, set(), lora=False, reference=True) == set(keys)  # sync_ref_model moves it
    check_checkpoint_weight_keys({"policy.a.lora_A"}, {"policy.a.lora_A"})  # a match passes
    expected = {f"policy.l{i}.lora_A" for i in range(7)}
    with pytest.raises(RuntimeError, match=r"7 missing \(policy.l0.lora_A, .* and 2 more\); 1 unexpected "
                                           r"\(policy.x\) weight key\(s\)"):
        check_checkpoint_weight_keys({"policy.x"}, expected)


def test_mix_reference_weights_by_hand():
    from gainrl_pl.models import mix_reference_weights

    torch.manual_seed(0)
    policy = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    reference = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    policy[1].running_mean.fill_(4.0)
    ref_w, pol_w = reference[0].weight.detach().clone(), policy[0].weight.detach().clone()
    mix_reference_weights(reference, policy, 0.25)
    torch.testing.assert_close(reference[0].weight, 0.25 * pol_w + 0.75 * ref_w)
    torch.testing.assert_close(reference[1].running_mean, torch.full((2,), 1.0))  # float buffers too: 0.25 * 4 + 0.75 * 0
    assert int(reference[1].num_batches_tracked) == 0  # integer buffers are not mixed
    torch.testing.assert_close(policy[0].weight, pol_w)  # the policy is untouched
    mix_reference_weights(reference, policy, 1.0)
    assert torch.equal(reference[0].weight, policy[0].weight)
    with pytest.raises(ValueError, match=r"ref_model_mixup_alpha=1.5 must be in \[0, 1\]"):
        mix_reference_weights(reference, policy, 1.5)
    with pytest.raises(ValueError, match="differ in 4 weight name"):
        mix_reference_weights(torch.nn.Sequential(torch.nn.Linear(3, 2)), policy, 0.5)
    with pytest.raises(ValueError, match=r"0.weight: reference shape \(4, 3\) != policy shape \(2, 3\)"):
        mix_reference_weights(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(2)), policy, 0.5)


@pytest.fixture(scope="module")
def dropout_model_dir(tmp_path_factory):
    """The tiny Llama with attention dropout 0.5: a float the attention forward reads, no nn.Dropout module."""
    from transformers import LlamaForCausalLM

    from gainrl_pl.testing import build_tiny_tokenizer, tiny_llama_config

    tokenizer = build_tiny_tokenizer()
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = tiny_llama_config(len(tokenizer), eos_token_id=eos, pad_token_id=eos)
    config.attention_dropout = 0.5
    path = tmp_path_factory.mktemp("dropout-llama")
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _two_train_forwards_differ(model) -> bool:
    model.train()
    ids = torch.arange(3, 19).view(2, 8)
    with torch.no_grad():
        return not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_disable_dropout_zeroes_attention_and_lora_dropout(dropout_model_dir):
    from gainrl_pl.models import LoraSettings, build_policy, disable_dropout

    model = load_model(str(dropout_model_dir))
    assert _two_train_forwards_differ(model)  # the dropout is live, so the test below can fail
    assert disable_dropout(model) == 2  # the two attention layers
    assert not _two_train_forwards_differ(model) and model.config.attention_dropout == 0.5  # config untouched
    lora = build_policy(str(dropout_model_dir), lora=LoraSettings(r=4, dropout=0.3))
    assert disable_dropout(lora) == 2 + 2 * 7  # attention layers + one lora_dropout per adapted linear
    assert all(m.p == 0 for m in lora.modules() if isinstance(m, torch.nn.Dropout))
    assert not _two_train_forwards_differ(lora) and disable_dropout(lora) == 0


def test_module_disable_dropout_reaches_policy_and_reference(dropout_model_dir):
    from gainrl_pl.module import GRPOModule

    module = GRPOModule(model_name_or_path=str(dropout_model_dir), beta=0.1, disable_dropout=True)
    assert not _two_train_forwards_differ(module.policy) and not _two_train_forwards_differ(module.ref_model)
    assert _two_train_forwards_differ(GRPOModule(model_name_or_path=str(dropout_model_dir)).policy)
