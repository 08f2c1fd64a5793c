import json

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

    model, _ = load(str(tiny_path), device="cpu", quantize=quantize)
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
