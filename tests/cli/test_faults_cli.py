"""Faults at the command line: arguments and stdin that are not UTF-8, a stdout that cannot take the output,
seeds out of range; and --version, the ignored outputs of the README's examples, the DDP launcher config."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import olmo2kit
from conftest import OLMO2KIT, one_line_error

ROOT = Path(__file__).parents[2]



def run(*args, stdin: bytes = b"", stdout=subprocess.PIPE, buffered: bool = True) -> subprocess.CompletedProcess:
    """The installed console script in a fresh process, bytes in and out; `buffered` stdout as a user's is, or
    written through at each print (PYTHONUNBUFFERED)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"} | ({} if buffered else
                                                                               {"PYTHONUNBUFFERED": "1"})
    return subprocess.run([str(OLMO2KIT), *args], input=stdin, stdout=stdout, stderr=subprocess.PIPE, env=env,
                          timeout=300)


# Not UTF-8: arguments, stdin, a --config file


def test_an_argument_that_is_not_utf8_is_one_line(cli, tiny_path, tiny_instruct_path):
    # Python hands an argument's undecodable bytes on as lone surrogates: b"\xff" is "\udcff".
    code, out, err = cli("generate", "caf\udce9", "--model", str(tiny_path))
    assert out == ""
    one_line_error(code, err, "the argument 'caf\\xe9' is not UTF-8 text: give it in UTF-8", alone=True)
    code, _, err = cli("chat", "--model", str(tiny_instruct_path), "--system", "\udcff", stdin="Hi\n")
    one_line_error(code, err, "the argument '\\xff' is not UTF-8 text", alone=True)


def test_an_argument_that_is_not_utf8_from_a_shell(tiny_path):
    result = run("generate", b"\xff", "--model", str(tiny_path))
    one_line_error(result.returncode, result.stderr.decode(), "the argument '\\xff' is not UTF-8 text", alone=True)
    assert result.stdout == b""


def test_perplexity_of_stdin_that_is_not_utf8_is_one_line_before_loading(cli, tiny_path):
    result = run("perplexity", "-", "--model", str(tiny_path), "--device", "cpu", stdin=b"Some text, then \xff.\n")
    one_line_error(result.returncode, result.stderr.decode(), "stdin is not UTF-8 text (byte 16): convert it first",
                   alone=True)
    assert result.stdout == b""
    # A text stream in place of stdin (as in this process) holds the same bytes as surrogates.
    code, _, err = cli("perplexity", "-", "--model", str(tiny_path), stdin="Some text, then \udcff.\n")
    one_line_error(code, err, "stdin is not UTF-8 text (byte 16)", alone=True)
    code, out, err = cli("perplexity", "-", "--model", str(tiny_path), "--device", "cpu", "--json",
                         stdin="Some text, then café.\n")
    assert code == 0 and '"tokens"' in out, err


def test_finetune_config_that_is_not_utf8_is_one_line(cli, tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_bytes(b"lr: 2.0e-5\n# caf\xe9 au lait\n")
    code, _, err = cli("finetune", "--config", str(config), "--data", str(tmp_path / "d"), "--output",
                       str(tmp_path / "o"))
    one_line_error(code, err, "UTF-8", alone=True)
    assert not (tmp_path / "o").exists()


# A stdout that cannot take the output


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
@pytest.mark.parametrize("args", [["sizes"], ["scores", "--json"], ["--help"], ["--version"]])
def test_a_full_stdout_is_one_line(args, buffered):
    # Buffered, the output waits in stdout's buffer and the full disk shows when it is flushed at the end;
    # unbuffered, it shows at the first print, inside the command.
    with open("/dev/full", "w") as full:
        result = run(*args, stdout=full, buffered=buffered)
    assert result.returncode == 2
    assert result.stderr.decode() == ("error: cannot write to stdout (No space left on device): "
                                      "free some space or send the output elsewhere\n")


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
@pytest.mark.parametrize("args", [["sizes"], ["scores", "--json"], ["--version"]])
def test_a_pipe_whose_reader_has_gone_ends_quietly(args, buffered):
    read, write = os.pipe()
    os.close(read)  # as `| head -1` does once it has its line
    try:
        result = run(*args, stdout=write, buffered=buffered)
    finally:
        os.close(write)
    assert (result.returncode, result.stderr) == (1, b"")


def test_stdout_closed_at_the_start_is_no_error():
    result = subprocess.run(f"{OLMO2KIT} sizes >&-", shell=True, stderr=subprocess.PIPE, timeout=300)
    assert (result.returncode, result.stderr) == (0, b"")


# Seeds out of range


def test_tiny_seed_out_of_range_is_one_line(cli, tmp_path):
    for seed in ("99999999999999999999", "4294967296", "-1"):
        code, out, err = cli("tiny", str(tmp_path / "t"), "--seed", seed)
        one_line_error(code, err, f"--seed must be an integer from 0 to 4294967295, got {seed}", alone=True)
    assert not (tmp_path / "t").exists()
    code, out, err = cli("tiny", str(tmp_path / "t"), "--seed", "4294967295")
    assert code == 0 and out.strip() == str(tmp_path / "t"), err


def test_generate_seed_out_of_range_is_one_line(cli, tiny_path):
    code, out, err = cli("generate", "Hello", "--model", str(tiny_path), "--seed", "4294967296")
    assert out == ""
    one_line_error(code, err, "seed", alone=True)
    assert "loaded" not in err


# Small additions


def test_version_is_printed_without_torch():
    code = (
        "import sys\n"
        "from olmo2kit.cli.app import main\n"
        "sys.argv = ['olmo2kit', '--version']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "print('HEAVY', sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout == f"olmo2kit {olmo2kit.__version__}\nHEAVY []\n", result.stderr
    assert run("--version").stdout.decode() == f"olmo2kit {olmo2kit.__version__}\n"


def test_the_readme_examples_outputs_are_ignored_by_git():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    outputs = ["tiny/config.json", "tiny-chat/config.json", "chat.json", "results.jsonl", ".results.jsonl.lock",
               "data/sft/input_ids.npy", "out/1b-sft/config.json", "ppl.jsonl", "ppl.png"]
    result = subprocess.run(["git", "check-ignore", "--no-index", *outputs], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.stdout.splitlines() == outputs
    kept = subprocess.run(["git", "check-ignore", "--no-index", "src/olmo2kit/cli/app.py", "configs/finetune/x.yaml"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert kept.stdout == ""


def test_the_ddp_config_leaves_the_process_count_to_the_launch():
    # accelerate 1.15 refuses a config without num_processes until --num_processes is given, instead of
    # starting a fixed count (8 processes on a 2-core CPU, say).
    text = (ROOT / "configs" / "accelerate" / "ddp.yaml").read_text()
    config = yaml.safe_load(text)
    assert "num_processes" not in config and config["distributed_type"] == "MULTI_GPU"
    assert "accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes" in text


def test_a_lone_surrogate_argument_from_python_is_one_line(cli, tiny_path):
    """Found by the fuzz test: an argument holding a surrogate that no bytes decode to (a Python caller's)
    broke the message that names it."""
    code, out, err = cli("generate", "\ud800", "--model", str(tiny_path))
    assert code == 2 and out == ""
    assert err.strip() == "error: the argument '\\ud800' is not UTF-8 text: give it in UTF-8"


# A model that cannot load: a batch job and a chat stop at the first failure, with exit code 2 and one line.

@pytest.fixture(scope="module")
def unloadable(tiny_path, tmp_path_factory):
    """(a copy of the tiny checkpoint that llama.cpp cannot load, the environment of a run with a GGUF cache of its
    own). Its config.json gives a feed-forward size its weights do not have: transformers refuses that as it loads,
    and llama.cpp's engine, which loads on first use, at the first line of a job or the first turn of a chat."""
    from importlib.util import find_spec

    from olmo2kit.errors import Olmo2KitError
    from olmo2kit.model.gguf import converter_dir

    try:
        if find_spec("llama_cpp") is None:
            raise Olmo2KitError("llama-cpp-python is not installed")
        converter_dir()
    except Olmo2KitError as e:
        pytest.skip(f"{e} (`make llamacpp` builds and installs both)")
    path = tmp_path_factory.mktemp("unloadable") / "tiny-unloadable"
    shutil.copytree(tiny_path, path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "intermediate_size": 2 * config["intermediate_size"]}))
    return path, {**os.environ, "OLMO2KIT_GGUF_CACHE": str(tmp_path_factory.mktemp("gguf-cache"))}


def only_error(result: subprocess.CompletedProcess) -> str:
    """The one error line of a run that stopped as a user error should: exit 2, no traceback, no warning."""
    err = result.stderr.decode()
    lines = [line for line in err.splitlines() if line.startswith(("error", "warning: line"))]
    assert result.returncode == 2 and "Traceback" not in err and len(lines) == 1, err
    assert err.rstrip().splitlines()[-1] == lines[0]
    return lines[0]


def test_a_model_that_cannot_load_stops_a_job_which_resumes_once_it_loads(cli, tiny_path, unloadable, tmp_path):
    path, env = unloadable
    source = tmp_path / "in.jsonl"
    out = tmp_path / "out.jsonl"
    job = ("generate", "--input", str(source), "--output", str(out), "--model", str(path), "-n", "3", "--greedy")
    bad_config = (path / "config.json").read_bytes()
    try:
        shutil.copyfile(tiny_path / "config.json", path / "config.json")
        source.write_text("".join(f'{{"id": {i}, "prompt": "Hello {i}"}}\n' for i in (1, 2)))
        assert cli(*job)[0] == 0
        written = out.read_bytes()
        source.write_text("".join(f'{{"id": {i}, "prompt": "Hello {i}"}}\n' for i in (1, 2, 3, 4)))
        (path / "config.json").write_bytes(bad_config)
        line = only_error(subprocess.run([str(OLMO2KIT), *job, "--engine", "llamacpp"], capture_output=True,
                                         env=env, timeout=600))
        assert "tiny-unloadable" in line and "llama.cpp cannot load" in line, line
        assert out.read_bytes() == written  # nothing after the failure was run; what was written stays
        shutil.copyfile(tiny_path / "config.json", path / "config.json")
        code, _, err = cli(*job)
        assert code == 0 and "2 result(s) appended" in err and "2 already there" in err
        assert [json.loads(row)["id"] for row in out.read_text().splitlines()] == [1, 2, 3, 4]
    finally:
        (path / "config.json").write_bytes(bad_config)


def test_a_model_that_cannot_load_ends_a_chat_at_its_first_turn(unloadable, tmp_path):
    path, env = unloadable
    transcript = tmp_path / "chat.json"
    result = subprocess.run([str(OLMO2KIT), "chat", "--model", str(path), "--engine", "llamacpp", "-n", "3"],
                            input=f"Hi\n/save {transcript}\nHello\n".encode(), capture_output=True, env=env,
                            timeout=600)
    line = only_error(result)
    assert "tiny-unloadable" in line and "llama.cpp cannot load" in line, line
    assert result.stdout == b"" and not transcript.exists()  # the lines after the failure were not read
