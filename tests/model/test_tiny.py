import json

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from olmo2kit.model.chat_template import OLMO2_CHAT_TEMPLATE
from olmo2kit.model.tiny import build_tiny


def test_plain_auto_classes_load_it(tiny_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_path)
    assert type(model).__name__ == "Olmo2ForCausalLM"
    assert (tiny_path / "model.safetensors").exists() and not list(tiny_path.glob("*.bin"))
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<|pad|>"
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.config.vocab_size == len(tokenizer)
    text = "The quick brown fox, 2 + 2 = 4! ünïcödé"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # byte-level: lossless


def test_same_seed_same_weights_other_seed_different(tmp_path):
    a = load_file(build_tiny(tmp_path / "a", seed=5) / "model.safetensors")
    b = load_file(build_tiny(tmp_path / "b", seed=5) / "model.safetensors")
    c = load_file(build_tiny(tmp_path / "c", seed=6) / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


def test_written_whole_leaving_no_staging(tmp_path):
    build_tiny(tmp_path / "t")
    build_tiny(tmp_path / "t", seed=2)  # replaces
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]


def test_instruct_template_renders_official_string(tiny_instruct_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_instruct_path)
    messages = [
        {"role": "system", "content": "You are OLMo."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|endoftext|><|system|>\nYou are OLMo.\n<|user|>\nHi\n<|assistant|>\nHello!<|endoftext|>\n"
        "<|user|>\nBye\n<|assistant|>\n"
    )
    assert tokenizer.chat_template == OLMO2_CHAT_TEMPLATE


def test_base_tiny_has_no_chat_template(tiny_path):
    config = json.loads((tiny_path / "tokenizer_config.json").read_text())
    assert "chat_template" not in config and not (tiny_path / "chat_template.jinja").exists()
