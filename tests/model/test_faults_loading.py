"""Checkpoints that are damaged, or not OLMo 2: each is one Olmo2KitError that names the file and says what to
do, never a model with random weights and never a traceback. Each case copies a tiny checkpoint and breaks one
thing in it."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from olmo2kit.errors import Olmo2KitError
from olmo2kit.model.loading import load, load_tokenizer

LORA_TARGETS = ["q_proj", "v_proj"]


def raises(message: str, where: str = "start"):
    """pytest.raises for an Olmo2KitError whose message holds `message` literally (at its start, or anywhere)."""
    pattern = re.escape(message)
    return pytest.raises(Olmo2KitError, match=f"^{pattern}" if where == "start" else pattern)


def copy(source: Path, tmp_path: Path, name: str = "ckpt") -> Path:
    return Path(shutil.copytree(source, tmp_path / name))


def edit_json(path: Path, **changes) -> None:
    """Set (or with None, remove) keys of a JSON file."""
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps({k: v for k, v in data.items() if v is not None}))


def assert_one_line_error(cli, path: Path, message: str, *command: str) -> None:
    """The CLI command on `path` prints `error: ...` with `message` as its one line, and exits 2."""
    code, out, err = cli(*(command or ("generate", "Hi", "-n", "2")), "--model", str(path))
    assert code == 2 and out == "" and "Traceback" not in err, err
    assert err.splitlines()[-1].startswith("error: ") and message in err.splitlines()[-1], err


# Another architecture, or weights that do not fill this one


@pytest.mark.parametrize(("model_type", "architecture"), [("gpt2", "GPT2LMHeadModel"), ("llama", "LlamaForCausalLM")])
def test_a_checkpoint_of_another_architecture_is_refused(tiny_path, tmp_path, cli, model_type, architecture):
    path = copy(tiny_path, tmp_path)
    edit_json(path / "config.json", model_type=model_type, architectures=[architecture])
    message = (f"its config.json gives model_type '{model_type}', and olmo2kit runs OLMo 2 checkpoints "
               "(model_type 'olmo2') only")
    with raises(f"{path} is not an OLMo 2 checkpoint: {message}"):
        load(str(path), dtype="fp32", device="cpu")
    assert_one_line_error(cli, path, message)


def test_a_config_without_model_type_is_refused(tiny_path, tmp_path):
    path = copy(tiny_path, tmp_path)
    edit_json(path / "config.json", model_type=None)
    with raises(f"{path} is not an OLMo 2 checkpoint: its config.json gives no model_type"):
        load(str(path), dtype="fp32", device="cpu")


def test_a_hub_checkpoint_of_another_architecture_is_refused_before_its_weights_download(
        tiny_path, tmp_path, hub, hub_server, hub_env):
    path = copy(tiny_path, tmp_path)
    edit_json(path / "config.json", model_type="llama", architectures=["LlamaForCausalLM"])
    hub_server.add_repo("org/llama", {"main": path})
    with pytest.raises(Olmo2KitError, match="^org/llama is not an OLMo 2 checkpoint: .* model_type 'llama'"):
        load("org/llama", dtype="fp32", device="cpu")
    fetched = [path.rsplit("/", 1)[-1] for _, path in hub.requests if path.startswith("/org/llama/resolve/")]
    assert set(fetched) == {"config.json"} and hub.count("/lfs/") == 0


def test_missing_weights_are_an_error_not_random_ones(tiny_path, tmp_path, cli):
    from safetensors.torch import load_file, save_file

    path = copy(tiny_path, tmp_path)
    weights = load_file(path / "model.safetensors")
    del weights["model.norm.weight"]
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    message = f"the weights of {path} do not match its config.json: 1 missing (model.norm.weight); give the config.json"
    with raises(message):
        load(str(path), dtype="fp32", device="cpu")
    assert_one_line_error(cli, path, "1 missing (model.norm.weight)")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        # one layer more than the weights hold: its 11 weights would be random
        ({"num_hidden_layers": 3}, r"11 missing \(model\.layers\.2\.mlp\.down_proj\.weight, .*, \.\.\.\)"),
        # one layer fewer: the second layer's weights would be dropped
        ({"num_hidden_layers": 1}, r"11 unexpected \(model\.layers\.1\.mlp\.down_proj\.weight, "),
        ({"hidden_size": 128}, r"25 of another shape \(lm_head\.weight, model\.embed_tokens\.weight, "),
    ],
)
def test_a_config_whose_sizes_do_not_match_the_weights(tiny_path, tmp_path, cli, changes, message):
    path = copy(tiny_path, tmp_path)
    edit_json(path / "config.json", **changes)
    prefix = re.escape(f"the weights of {path} do not match its config.json: ")
    with pytest.raises(Olmo2KitError, match=f"^{prefix}{message}"):
        load(str(path), dtype="fp32", device="cpu")
    assert_one_line_error(cli, path, "do not match its config.json")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_hidden_layers": -1}, "gives num_hidden_layers -1: it must be a positive whole number"),
        ({"intermediate_size": 0}, "gives intermediate_size 0: it must be a positive whole number"),
        ({"hidden_size": 66}, "gives hidden_size 66, not a multiple of its num_attention_heads 4"),
    ],
)
def test_a_config_with_impossible_sizes(tiny_path, tmp_path, cli, changes, message):
    path = copy(tiny_path, tmp_path)
    edit_json(path / "config.json", **changes)
    with raises(f"the config of {path} {message}"):
        load(str(path), dtype="fp32", device="cpu")
    assert_one_line_error(cli, path, message)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"garbage", "config.json is not valid JSON"),
        (b"\xff\xfe{}", "config.json is not valid JSON"),
        (b"null", "config.json holds a JSON NoneType, not an object"),
    ],
)
def test_a_garbage_config(tiny_path, tmp_path, cli, content, message):
    path = copy(tiny_path, tmp_path)
    (path / "config.json").write_bytes(content)
    with raises(message, where="anywhere"):
        load(str(path), dtype="fp32", device="cpu")
    assert_one_line_error(cli, path, message)


def test_a_config_value_transformers_refuses(tiny_path, tmp_path, cli):
    path = copy(tiny_path, tmp_path)
    edit_json(path / "config.json", rope_parameters=5)
    message = f"the config.json of {path} is not one transformers can read (Validation error for field 'rope_param"
    with raises(message):
        load(str(path), dtype="fp32", device="cpu")
    assert_one_line_error(cli, path, message)


# Damaged weights files


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def scribble(path: Path) -> None:
    path.write_bytes(b"\x00 not safetensors " * 64)


@pytest.mark.parametrize("damage", [truncate, scribble])
def test_a_damaged_weights_file_is_named(tiny_path, tmp_path, cli, damage):
    path = copy(tiny_path, tmp_path)
    damage(path / "model.safetensors")
    message = f"{path / 'model.safetensors'} is truncated or not safetensors ("
    with pytest.raises(Olmo2KitError, match=r"\): copy the checkpoint again from where it came, or save it again$"):
        load(str(path), dtype="fp32", device="cpu")
    assert_one_line_error(cli, path, message)
    assert_one_line_error(cli, path, message, "bench", "--new-tokens", "4", "--repeat", "1")
    tasks = Path(__file__).parents[1] / "evals" / "lm_eval_tasks"
    assert_one_line_error(cli, path, message, "eval", "--tasks", "olmo2kit_tiny_mc", "--include-path", str(tasks))


def test_damaged_cached_weights_of_a_hub_model_say_how_to_remove_them(tiny_path, tmp_path, hub_server, hub_env):
    path = copy(tiny_path, tmp_path)
    truncate(path / "model.safetensors")
    hub_server.add_repo("org/torn", {"main": path})
    with pytest.raises(Olmo2KitError, match=r"^the cached weights of org/torn are truncated or not safetensors .*"
                                            r"`hf cache rm model/org/torn`"):
        load("org/torn", dtype="fp32", device="cpu")


# Tokenizer files


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("tokenizer.json", b"not json{", "tokenizer.json is not a tokenizer file (expected ident"),
        ("tokenizer.json", b"{}", "tokenizer.json is not a tokenizer file (Model missing"),
        ("tokenizer.json", b"[]", "tokenizer.json is not a tokenizer file (invalid type"),
        ("tokenizer_config.json", b"not json{", "tokenizer_config.json is not valid JSON"),
        ("tokenizer_config.json", b"[]", "tokenizer_config.json holds a JSON list, not an object"),
        ("tokenizer_config.json", b"\xff\xfe", "tokenizer_config.json is not valid JSON"),
    ],
)
def test_a_garbage_tokenizer_file_is_named(tiny_path, tmp_path, cli, name, content, message):
    path = copy(tiny_path, tmp_path)
    (path / name).write_bytes(content)
    with raises(f"{path / message}"):
        load(str(path), dtype="fp32", device="cpu")
    with raises(f"{path / message}"):
        load_tokenizer(str(path))
    assert_one_line_error(cli, path, message)


def test_missing_tokenizer_files(tiny_path, tmp_path, cli):
    path = copy(tiny_path, tmp_path)
    (path / "tokenizer.json").unlink()
    (path / "tokenizer_config.json").unlink()
    message = f"cannot load the tokenizer of {path} (Couldn't instantiate the backend tokenizer"
    with raises(message):
        load(str(path), dtype="fp32", device="cpu")
    assert_one_line_error(cli, path, message)


# LoRA adapters


@pytest.fixture(scope="module")
def adapter(tiny_path, tmp_path_factory) -> Path:
    """A LoRA adapter saved by peft on the tiny checkpoint, which it records by its absolute path."""
    from peft import LoraConfig, get_peft_model

    base, _ = load(str(tiny_path), dtype="fp32", device="cpu")
    path = tmp_path_factory.mktemp("lora") / "adapter"
    get_peft_model(base, LoraConfig(r=4, target_modules=LORA_TARGETS)).save_pretrained(path)
    assert json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_path)
    return path


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"garbage", "adapter_config.json is not valid JSON"),
        (b"[1]", "adapter_config.json holds a JSON list, not an object"),
        (b"{}", "holds a LoRA adapter without base_model_name_or_path"),
    ],
)
def test_a_garbage_adapter_config(adapter, tmp_path, cli, content, message):
    path = copy(adapter, tmp_path, "adapter")
    (path / "adapter_config.json").write_bytes(content)
    with raises(message, where="anywhere"):
        load(str(path), dtype="fp32", device="cpu")
    assert_one_line_error(cli, path, message)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"peft_type": None}, "gives peft_type None: olmo2kit loads LoRA adapters"),
        ({"peft_type": "IA3"}, "gives peft_type 'IA3': olmo2kit loads LoRA adapters"),
        ({"r": "x"}, "gives r 'x': a LoRA rank is a positive whole number"),
        ({"revision": 5}, "gives revision 5: a revision is a branch, tag or commit name"),
    ],
)
def test_an_adapter_config_with_wrong_values(adapter, tmp_path, changes, message):
    path = copy(adapter, tmp_path, "adapter")
    edit_json(path / "adapter_config.json", **changes)
    with raises(f"{path / 'adapter_config.json'} {message}"):
        load(str(path), dtype="fp32", device="cpu")


@pytest.mark.parametrize("damage", [truncate, scribble, Path.unlink])
def test_a_damaged_or_missing_adapter_weights_file(adapter, tmp_path, cli, damage):
    path = copy(adapter, tmp_path, "adapter")
    damage(path / "adapter_model.safetensors")
    message = "holds no adapter_model.safetensors" if damage is Path.unlink else (
        f"{path / 'adapter_model.safetensors'} is truncated or not safetensors (")
    with pytest.raises(Olmo2KitError, match="copy the adapter again, or save it again$"):
        load(str(path), dtype="fp32", device="cpu")
    assert_one_line_error(cli, path, message)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"r": 8}, "does not fit its base model (its weights have other shapes)"),
        ({"target_modules": ["nothing_like_this"]}, "targets modules its base model lacks"),
    ],
)
def test_an_adapter_made_for_another_base(adapter, tmp_path, changes, message):
    path = copy(adapter, tmp_path, "adapter")
    edit_json(path / "adapter_config.json", **changes)
    with raises(f"the LoRA adapter {path} {message}"):
        load(str(path), dtype="fp32", device="cpu")


@pytest.mark.parametrize("base", ["tiny", "./tiny", "out/tiny"])
def test_an_adapter_with_a_relative_base_is_refused_wherever_it_runs(adapter, tiny_instruct_path, tmp_path,
                                                                     monkeypatch, base):
    path = copy(adapter, tmp_path, "adapter")
    edit_json(path / "adapter_config.json", base_model_name_or_path=base)
    # Where olmo2kit runs, the relative path names another checkpoint, which must not load in the base's place.
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(tiny_instruct_path, elsewhere / base)
    monkeypatch.chdir(elsewhere)
    with raises(f"{path / 'adapter_config.json'} records its base model as the relative path '{base}', which "
                "depends on the folder olmo2kit runs in: give the base's absolute path there"):
        load(str(path), dtype="fp32", device="cpu")


def test_an_adapter_on_a_size_alias_or_a_hub_repo_is_not_a_relative_path(adapter, tmp_path, hub, hub_env):
    from peft import PeftModel

    path = copy(adapter, tmp_path, "adapter")
    edit_json(path / "adapter_config.json", base_model_name_or_path="org/repo")  # served by the loopback Hub
    model, _ = load(str(path), dtype="fp32", device="cpu")
    assert isinstance(model, PeftModel)
    edit_json(path / "adapter_config.json", base_model_name_or_path="1b")
    hub.reset()
    with pytest.raises(Olmo2KitError, match="allenai/OLMo-2-0425-1B not found on the Hub"):  # looked up, not refused
        load(str(path), dtype="fp32", device="cpu")


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tiny_path, tmp_path, cli):
    """Another model's tokenizer, with more tokens than the embeddings, would fail mid-generation on its last ids."""
    path = copy(tiny_path, tmp_path)
    tokenizer = load_tokenizer(str(path))
    vocab_size = json.loads((path / "config.json").read_text())["vocab_size"]
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(vocab_size - len(tokenizer) + 1)])
    tokenizer.save_pretrained(path)
    message = f"the tokenizer of {path} has {vocab_size + 1:,} tokens, more than the model's {vocab_size:,} embeddings"
    with raises(message):
        load(str(path), dtype="fp32", device="cpu")
    assert_one_line_error(cli, path, message)
