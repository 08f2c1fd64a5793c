import json
import shutil
import subprocess
import sys

import pytest

from conftest import one_line_error, run_olmo2kit


def test_generate_streams_text_and_reports_on_stderr(cli, tiny_path):
    code, out, err = cli("generate", "Language modeling is ", "--model", str(tiny_path), "-n", "8", "--seed", "1")
    assert code == 0
    assert out.endswith("\n") and len(out) > 1
    assert "loaded" in err and "tokens/s" in err and "peak memory" in err


def test_generate_json_one_object_per_prompt(cli, tiny_path):
    code, out, _ = cli("generate", "Hello", "The sea", "--model", str(tiny_path), "--max-new-tokens", "5",
                       "--greedy", "--json")
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in rows] == ["Hello", "The sea"]
    for row in rows:
        assert set(row) == {"prompt", "text", "new_tokens", "finish_reason", "tokens_per_s", "engine",
                            "engine_version"}
        assert row["engine"] == "transformers"
        assert row["new_tokens"] == 5 and row["finish_reason"] == "length"


def test_greedy_cli_equals_library(cli, tiny, tiny_path):
    from olmo2kit.inference.generation import generate

    model, tokenizer = tiny
    expected = generate(model, tokenizer, "Hello", do_sample=False, max_new_tokens=10).text
    _, out, _ = cli("generate", "Hello", "--model", str(tiny_path), "-n", "10", "--greedy", "--json")
    assert json.loads(out)["text"] == expected
    _, streamed, _ = cli("generate", "Hello", "--model", str(tiny_path), "-n", "10", "--greedy")
    assert streamed == expected + "\n"


def test_prompt_from_stdin(cli, tiny_path):
    code, out, _ = cli("generate", "-", "--model", str(tiny_path), "-n", "3", "--json", stdin="Once upon a time")
    assert code == 0 and json.loads(out)["prompt"] == "Once upon a time"


def test_sampling_options_and_seed(cli, tiny_path):
    args = ("generate", "Hello", "--model", str(tiny_path), "-n", "12", "--temperature", "0.8", "--top-k", "20",
            "--top-p", "0.9", "--json")
    first = json.loads(cli(*args, "--seed", "3")[1])["text"]
    again = json.loads(cli(*args, "--seed", "3")[1])["text"]
    other = json.loads(cli(*args, "--seed", "4")[1])["text"]
    assert first == again != other


def test_stop_option(cli, tiny, tiny_path):
    from olmo2kit.inference.generation import generate

    model, tokenizer = tiny
    full = generate(model, tokenizer, "Hello", do_sample=False, max_new_tokens=30).text
    stop = full[8:11]
    _, out, _ = cli("generate", "Hello", "--model", str(tiny_path), "-n", "30", "--greedy", "--stop", stop, "--json")
    row = json.loads(out)
    assert row["text"] == full[: full.find(stop)] and row["finish_reason"] == "stop"


@pytest.mark.parametrize(("args", "shown"), [(("--dtype", "bf16"), "bfloat16"), (("--dtype", "fp32"), "float32"),
                                             (("--quantize", "nf4"), "nf4"), (("-q", "int8"), "int8"),
                                             (("--device", "cpu"), "cpu")])
def test_load_options(cli, tiny_path, args, shown):
    code, out, err = cli("generate", "Hello", "--model", str(tiny_path), "-n", "3", "--json", *args)
    assert code == 0 and json.loads(out)["new_tokens"] == 3
    assert shown in err.splitlines()[0]


def test_fp16_warns(cli, tiny_path):
    code, _, err = cli("generate", "Hello", "--model", str(tiny_path), "-n", "2", "--dtype", "fp16")
    assert code == 0 and "warning: fp16" in err


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--top-p", "0"), "top_p must be in (0, 1]"),
        (("--top-p", "1.2"), "top_p must be in (0, 1]"),
        (("--top-k", "-1"), "top_k"),
        (("--max-new-tokens", "-5"), "max_new_tokens must be at least 1"),
        (("--temperature", "0"), "temperature must be from 0.01 to 100.0"),
        (("--dtype", "fp8"), "unknown dtype"),
        (("--quantize", "int4"), "unknown quantization"),
        (("--device", "tpu"), "unknown device"),
        (("--device", "cuda:x"), "unknown device 'cuda:x'"),
        (("--revision", "main"), "local directory"),
    ],
)
def test_bad_options_are_one_line_errors(cli, tiny_path, args, needle):
    code, _, err = cli("generate", "Hello", "--model", str(tiny_path), *args)
    one_line_error(code, err, needle)


def test_unknown_alias_lists_the_valid_ones(cli):
    code, _, err = cli("generate", "Hello", "--model", "2b")
    one_line_error(code, err, "unknown model '2b'")
    assert "7b-instruct" in err and "32b-dpo" in err


def test_missing_local_path(cli):
    code, _, err = cli("generate", "Hello", "--model", "./not-here")
    one_line_error(code, err, "no such directory: ./not-here")


def test_local_path_that_is_no_checkpoint(cli, tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    code, _, err = cli("generate", "Hello", "--model", str(tmp_path))
    one_line_error(code, err, f"{tmp_path} holds no config.json: it is not a checkpoint")
    code, _, err = cli("generate", "Hello", "--model", str(tmp_path / "notes.txt"))
    one_line_error(code, err, "notes.txt is a file: give a checkpoint directory")


def test_model_not_cached_offline_points_to_tiny(cli, offline_hub):
    code, _, err = cli("generate", "Hello", "--model", "1b")
    one_line_error(code, err, "olmo2kit tiny")


def test_missing_bitsandbytes(cli, tiny_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    code, _, err = cli("generate", "Hello", "--model", str(tiny_path), "--quantize", "nf4")
    one_line_error(code, err, "needs bitsandbytes")


def test_empty_prompt(cli, tiny_path):
    code, _, err = cli("generate", "  ", "--model", str(tiny_path))
    one_line_error(code, err, "empty prompt")
    code, _, err = cli("generate", "-", "--model", str(tiny_path), stdin="")
    one_line_error(code, err, "empty prompt")


@pytest.mark.skipif(sys.platform != "linux", reason="no-GPU message")
def test_cuda_without_gpu(cli, tiny_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    code, _, err = cli("generate", "Hello", "--model", str(tiny_path), "--device", "cuda")
    one_line_error(code, err, "no CUDA GPU")


def test_debug_shows_the_traceback():
    result = run_olmo2kit("--debug", "generate", "Hello", "--model", "2b")
    assert result.returncode != 0 and "Traceback" in result.stderr and "Olmo2KitError" in result.stderr


def test_usage_errors_exit_2(cli):
    code, _, err = cli("generate")
    assert code == 2 and "Missing argument" in err


def test_tiny_command(cli, tmp_path):
    code, out, _ = cli("tiny", str(tmp_path / "t"), "--instruct", "--seed", "3")
    assert code == 0 and out.strip() == str(tmp_path / "t")
    assert (tmp_path / "t" / "model.safetensors").exists()


def test_tiny_never_replaces_what_is_not_a_checkpoint(cli, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    code, _, err = cli("tiny", str(tmp_path))
    one_line_error(code, err, "exists and is not a checkpoint, so it is not replaced")
    assert (tmp_path / "keep.txt").read_text() == "mine"
    code, _, err = cli("tiny", str(tmp_path / "keep.txt"))
    one_line_error(code, err, "exists and is not a checkpoint")
    code, _, err = cli("tiny", str(tmp_path / "keep.txt" / "t"))
    one_line_error(code, err, "keep.txt is a file, not a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_help_lists_commands_without_importing_torch():
    code = (
        "import sys\n"
        "from olmo2kit.cli.app import main\n"
        "sys.argv = ['olmo2kit', '--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('HEAVY', sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    for command in ("generate", "sizes", "tiny", "list-revisions"):
        assert command in result.stdout
    assert "HEAVY []" in result.stdout


def test_sizes_imports_neither_torch_nor_transformers():
    code = (
        "import sys\n"
        "from olmo2kit.cli.app import main\n"
        "sys.argv = ['olmo2kit', 'sizes', '--json']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "print('HEAVY', sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "HEAVY []" in result.stdout


def test_python_dash_m():
    result = subprocess.run([sys.executable, "-m", "olmo2kit", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "generate" in result.stdout


def test_compile_and_draft_model_options(cli, tiny_path, tmp_path):
    from olmo2kit.model.tiny import build_tiny

    args = ("generate", "Hello", "--model", str(tiny_path), "-n", "12", "--greedy", "--json")
    plain = json.loads(cli(*args)[1])["text"]
    code, out, _ = cli(*args, "--compile")
    assert code == 0 and json.loads(out)["text"] == plain
    draft = build_tiny(tmp_path / "draft", seed=4)
    code, out, _ = cli(*args, "--draft-model", str(draft))
    assert code == 0 and json.loads(out)["text"] == plain
    code, _, err = cli(*args, "--compile", "--draft-model", str(draft))
    one_line_error(code, err, "choose one of compile and a draft model")


def test_chat_compile_gives_the_same_replies(cli, tiny_instruct_path):
    args = ("chat", "--model", str(tiny_instruct_path), "--greedy", "--max-new-tokens", "10")
    plain = cli(*args, stdin="Hi\nAnd again?\n")
    compiled = cli(*args, "--compile", stdin="Hi\nAnd again?\n")
    assert plain[0] == compiled[0] == 0
    assert compiled[1] == plain[1] and plain[1].strip()


def without_context(checkpoint, directory):
    """A copy of `checkpoint` whose config says max_position_embeddings: -1, as OLMo-core's exporter writes it."""
    shutil.copytree(checkpoint, directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "max_position_embeddings": -1}))
    return directory


def test_checkpoint_without_a_context_length_runs(cli, tiny_path, tiny_instruct_path, tmp_path):
    base = without_context(tiny_path, tmp_path / "base")
    code, out, err = cli("generate", "Hello", "--model", str(base), "-n", "5", "--greedy")
    assert code == 0 and out.strip(), err
    assert [line for line in err.splitlines() if "context" in line] == [
        f"warning: {base} gives no context length (max_position_embeddings -1): prompt lengths are not checked"
    ]
    (tmp_path / "text.txt").write_text("The quick brown fox jumps over the lazy dog.\n")
    code, out, err = cli("perplexity", str(tmp_path / "text.txt"), "--model", str(base), "--device", "cpu")
    assert code == 0 and "perplexity" in out, err
    instruct = without_context(tiny_instruct_path, tmp_path / "instruct")
    code, out, err = cli("chat", "--model", str(instruct), "-n", "4", "--greedy", stdin="Hi\n")
    assert code == 0 and out.strip(), err


def test_warnings_are_one_line_however_often_main_runs(cli, tiny_path):
    """The in-process CLI runs main() once per call: the warning handler must be added once, not once a call."""
    for _ in range(3):
        code, _, err = cli("generate", "Hi", "--model", str(tiny_path), "-n", "2", "--dtype", "fp16", "--device", "cpu")
        assert code == 0, err
        assert [line for line in err.splitlines() if line.startswith("warning:") and "fp16" in line] == [
            "warning: fp16 asked for: OLMo 2 was trained in bf16 and its activations can overflow fp16"
        ]
