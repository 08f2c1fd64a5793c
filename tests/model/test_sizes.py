import json
import logging

import pytest

from olmo2kit.errors import Olmo2KitError
from olmo2kit.model import sizes
from olmo2kit.model.sizes import SIZES, Size, hf_config, weight_bytes

EXPECTED_PARAMS = {"1b": 1_484_916_736, "7b": 7_298_617_344, "13b": 13_716_198_400, "32b": 32_234_279_936}

# The fields of the published config.json files that define the architecture.
PUBLISHED = {
    "1b": dict(num_hidden_layers=16, hidden_size=2048, num_attention_heads=16, num_key_value_heads=16,
               intermediate_size=8192),
    "7b": dict(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=32,
               intermediate_size=11008),
    "13b": dict(num_hidden_layers=40, hidden_size=5120, num_attention_heads=40, num_key_value_heads=40,
                intermediate_size=13824),
    "32b": dict(num_hidden_layers=64, hidden_size=5120, num_attention_heads=40, num_key_value_heads=8,
                intermediate_size=27648),
}
SHARED = dict(vocab_size=100352, max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
              eos_token_id=100257, pad_token_id=100277, hidden_act="silu", attention_bias=False)


@pytest.mark.parametrize("name", list(SIZES))
def test_params_from_architecture(name):
    assert SIZES[name].params == EXPECTED_PARAMS[name]


@pytest.mark.parametrize("name", list(SIZES))
def test_params_match_transformers_model_on_meta_device(name):
    import torch
    from transformers import Olmo2ForCausalLM

    with torch.device("meta"):
        model = Olmo2ForCausalLM(hf_config(name))
    assert sum(p.numel() for p in model.parameters()) == EXPECTED_PARAMS[name]
    linear = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    assert SIZES[name].linear_params == linear


@pytest.mark.parametrize("name", list(SIZES))
def test_hf_config_equals_published_values(name):
    config = hf_config(name)
    for key, value in {**SHARED, **PUBLISHED[name]}.items():
        assert getattr(config, key) == value, key
    assert config.rope_parameters["rope_theta"] == 500000
    assert config.model_type == "olmo2"
    assert config.use_cache is True


def test_aliases_cover_every_size_and_variant():
    table = sizes.aliases()
    assert table["1b"] == "allenai/OLMo-2-0425-1B"
    assert table["1b-instruct"] == "allenai/OLMo-2-0425-1B-Instruct"
    assert table["7b-sft"] == "allenai/OLMo-2-1124-7B-SFT"
    assert table["13b-dpo"] == "allenai/OLMo-2-1124-13B-DPO"
    assert table["32b"] == "allenai/OLMo-2-0325-32B"
    assert len(table) == 16
    assert sizes.resolve_alias("7B-Instruct") == "allenai/OLMo-2-1124-7B-Instruct"
    assert sizes.resolve_alias("8b") is None


def test_size_of_repo_and_alias():
    assert sizes.size_of("allenai/OLMo-2-1124-13B-DPO").name == "13b"
    assert sizes.size_of("32b-instruct").name == "32b"
    assert sizes.size_of("someone/else") is None


@pytest.mark.parametrize(
    ("model", "name"),
    [
        ("1b", "1b"),
        ("7B", "7b"),
        (" 13b-dpo ", "13b"),
        ("32b-instruct@main", "32b"),
        ("allenai/OLMo-2-0425-1B", "1b"),
        ("allenai/OLMo-2-1124-7B-SFT", "7b"),
        ("ALLENAI/olmo-2-1124-13b-instruct", "13b"),
        ("allenai/OLMo-2-0325-32B-DPO@stage2-ingredient1-step11921-tokens101B", "32b"),
        ("8b", None),
        ("allenai/OLMo-2-0425-1B2", None),  # a repo id that only begins like a size's
        ("allenai/OLMo-2-1124-1B", None),
        ("someone/OLMo-2-0425-1B", None),
    ],
)
def test_size_of_names_aliases_and_repo_ids(model, name):
    found = sizes.size_of(model)
    assert (found.name if found else None) == name


def test_get_size_and_architecture(tiny_path, tmp_path):
    with pytest.raises(Olmo2KitError, match="unknown size '8b': use one of 1b, 7b, 13b, 32b"):
        sizes.get_size("8b")
    assert sizes.architecture("allenai/OLMo-2-1124-7B-Instruct") is SIZES["7b"]
    config = json.loads((tiny_path / "config.json").read_text())
    tiny = sizes.architecture(str(tiny_path))
    assert (tiny.num_hidden_layers, tiny.hidden_size, tiny.num_key_value_heads, tiny.vocab_size) == (
        config["num_hidden_layers"], config["hidden_size"], config["num_key_value_heads"], config["vocab_size"])
    with pytest.raises(Olmo2KitError, match="cannot tell the architecture"):
        sizes.architecture(str(tmp_path / "nonexistent-dir"))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(num_hidden_layers=-1), "gives num_hidden_layers -1: it must be a positive whole number"),
        (dict(hidden_size=0), "gives hidden_size 0: it must be a positive whole number"),
        (dict(vocab_size=True), "gives vocab_size True: it must be a positive whole number"),
        (dict(intermediate_size=2.5), "gives intermediate_size 2.5: it must be a positive whole number"),
        (dict(num_key_value_heads=3), "gives num_attention_heads 16, not a multiple of its num_key_value_heads 3"),
    ],
)
def test_from_config_refuses_sizes_that_are_not_positive_whole_numbers(changes, message):
    config = {**hf_config("1b").to_dict(), **changes}
    with pytest.raises(Olmo2KitError, match=f"^the config of x {message} \\(fix its config.json\\)$"):
        Size.from_config("x", config)
    assert Size.from_config("x", hf_config("1b")).same_architecture(SIZES["1b"])  # an Olmo2Config is read as well


def test_checkpoint_architecture_refuses_other_model_types():
    config = hf_config("1b").to_dict()
    assert sizes.checkpoint_architecture("x", config).same_architecture(SIZES["1b"])
    with pytest.raises(Olmo2KitError, match="^x is not an OLMo 2 checkpoint: its config.json gives model_type 'gpt2'"):
        sizes.checkpoint_architecture("x", {**config, "model_type": "gpt2"})


def test_32b_has_three_stage2_runs():
    assert SIZES["32b"].stage2_runs == (100_000_000_000, 100_000_000_000, 300_000_000_000)
    assert SIZES["32b"].training_tokens == 6_500_000_000_000


def test_context_length_of_configs_that_give_none(tiny_path, monkeypatch, caplog):
    from transformers import AutoConfig

    monkeypatch.setattr(sizes, "_warned_context", set())  # what earlier tests warned about
    exported = hf_config("1b", max_position_embeddings=-1)  # as OLMo-core's exporter writes it
    unknown = AutoConfig.from_pretrained(tiny_path, max_position_embeddings=0)  # no OLMo 2 size
    with caplog.at_level(logging.WARNING, logger="olmo2kit"):
        assert sizes.context_length(exported) == 4096
        assert sizes.context_length(exported) == 4096
        assert sizes.context_length(unknown) is None
        assert sizes.context_length(hf_config("7b", max_position_embeddings=8192)) == 8192
    assert [r.getMessage() for r in caplog.records if r.name == "olmo2kit"] == [
        "the model gives no context length (max_position_embeddings -1): using 1b's 4096 tokens",
        f"{tiny_path} gives no context length (max_position_embeddings 0): prompt lengths are not checked",
    ]


def test_check_context_messages():
    with pytest.raises(Olmo2KitError, match="the prompt is 10 tokens, which fills the model's 10-token context"):
        sizes.check_context(10, 1, 10)
    with pytest.raises(Olmo2KitError, match="passes the model's 10-token context: lower max_new_tokens to 4 or"):
        sizes.check_context(6, 5, 10)
    with pytest.raises(Olmo2KitError, match="lower --max-new-tokens to 4 or shorten the conversation$"):
        sizes.check_context(6, 5, 10, prompt="the conversation", new="--max-new-tokens")
    assert sizes.check_context(6, 4, 10) is None  # exactly fills it
    assert sizes.check_context(10**6, 10**6, None) is None


def test_6nd_is_close_to_published_flops():
    for size in SIZES.values():
        assert size.training_flops == pytest.approx(size.published_flops, rel=0.05)


def test_tokens_per_step_reproduces_published_branch_names():
    # Branch names round the token count up to the next billion.
    cases = [("1b", 140000, 294), ("1b", 1907359, 4001), ("7b", 928646, 3896), ("13b", 596057, 5001),
             ("32b", 721901, 6056), ("32b", 11921, 101)]
    for name, step, label in cases:
        tokens_b = SIZES[name].tokens_per_step * step / 1e9
        assert label - 1 < tokens_b <= label


def test_weight_memory_matches_published_footprints():
    # Measured on an H200 for the 1B: bf16 2.97 GB, int8 1.90 GB, nf4 1.36 GB.
    assert weight_bytes("1b", "bf16") / 1e9 == pytest.approx(2.97, rel=0.01)
    assert weight_bytes("1b", "bf16", "int8") / 1e9 == pytest.approx(1.90, rel=0.02)
    assert weight_bytes("1b", "bf16", "nf4") / 1e9 == pytest.approx(1.36, rel=0.10)
    assert weight_bytes("7b", "fp32") == 4 * EXPECTED_PARAMS["7b"]


@pytest.mark.parametrize("quantize", [None, "int8", "nf4"])
def test_weight_memory_matches_loaded_tiny_checkpoint(tiny_path, tiny, quantize):
    from olmo2kit.model.loading import load

    model, _ = load(str(tiny_path), dtype="fp32", device="cpu", quantize=quantize)
    size = Size.from_config("tiny", model.config)
    assert size.params == sum(p.numel() for p in tiny[0].parameters())
    estimate = weight_bytes(size, "fp32", quantize)
    assert estimate == pytest.approx(model.get_memory_footprint(), rel=0.10)


def test_bad_names_are_user_errors():
    with pytest.raises(Olmo2KitError, match="unknown size"):
        hf_config("3b")
    with pytest.raises(Olmo2KitError, match="unknown quantization"):
        weight_bytes("1b", "bf16", "int4")
    with pytest.raises(Olmo2KitError, match="unknown dtype"):
        weight_bytes("1b", "fp8")


def test_sizes_cli_table_and_json(cli):
    code, out, _ = cli("sizes")
    assert code == 0
    assert "1,484,916,736" in out and "allenai/OLMo-2-0325-32B" in out
    code, out, _ = cli("sizes", "--json")
    rows = json.loads(out)
    assert [r["size"] for r in rows] == ["1b", "7b", "13b", "32b"]
    assert {r["size"]: r["params"] for r in rows} == EXPECTED_PARAMS
    assert rows[3]["repo"] == "allenai/OLMo-2-0325-32B" and rows[3]["kv_heads"] == 8
