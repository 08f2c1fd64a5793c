"""GGUF conversion, its cache, `--engine llamacpp` through the CLI, `export gguf` / `export ollama`, serving
on llama.cpp, and the one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import OLMO2KIT, one_line_error, run_olmo2kit
from olmo2kit.model.gguf import OLMO2_LLAMA_CPP_PRE, cache_path, cached_gguf, checkpoint_dir, gguf_file
from olmo2kit.model.tiny import build_tiny
from serving import serving


def _ggufs(cache: Path) -> list[Path]:
    return sorted(cache.rglob("*.gguf"))


def test_cli_generate_on_llamacpp_matches_transformers(tiny_path, tmp_path):
    env = {"OLMO2KIT_GGUF_CACHE": str(tmp_path / "cache")}
    args = ["generate", "Language modeling is", "-m", str(tiny_path), "--greedy", "--max-new-tokens", "16", "--json"]
    first = run_olmo2kit(*args, "--engine", "llamacpp", "--dtype", "fp32", env=env)
    assert first.returncode == 0, first.stderr
    assert "converting" in first.stderr and "(GGUF f32, cpu, llamacpp)" in first.stderr
    again = run_olmo2kit(*args, "--engine", "llamacpp", "--dtype", "fp32", env=env)
    assert again.returncode == 0 and "converting" not in again.stderr, again.stderr  # the cache is reused
    theirs = run_olmo2kit(*args, "--dtype", "fp32", "--engine", "transformers")
    ours, reference = json.loads(first.stdout), json.loads(theirs.stdout)
    assert ours["text"] == reference["text"] and ours["new_tokens"] == reference["new_tokens"] == 16
    assert ours["engine"] == "llamacpp" and json.loads(again.stdout)["text"] == ours["text"]
    assert [p.name for p in _ggufs(tmp_path / "cache")] == ["f32.gguf"]


def test_cache_is_reused_and_a_rewritten_checkpoint_converts_again(tmp_path):
    path = build_tiny(tmp_path / "tiny", seed=0)
    said = []
    first = gguf_file(str(path), gguf_type="f16", say=said.append)
    stamp = first.stat().st_mtime_ns
    assert gguf_file(str(path), gguf_type="f16", say=said.append) == first and len(said) == 1
    assert first.stat().st_mtime_ns == stamp
    build_tiny(path, seed=1)  # new weights in the same directory: a new key
    second = gguf_file(str(path), gguf_type="f16", say=said.append)
    assert second != first and len(said) == 2 and second.is_file()


def test_a_changed_revision_converts_again(hub, hub_env, tiny_path):
    from hub import read_checkpoint

    files = read_checkpoint(tiny_path)
    later = {**files, "config.json": files["config.json"] + b"\n"}  # another commit
    hub.add_repo("allenai/OLMo-2-tiny", {"main": files, "stage1-step1000-tokens5B": files,
                                         "stage1-step2000-tokens9B": later})
    said = []
    one = gguf_file("allenai/OLMo-2-tiny@stage1-step1000-tokens5B", gguf_type="f16", say=said.append)
    two = gguf_file("allenai/OLMo-2-tiny", revision="stage1-step2000-tokens9B", gguf_type="f16", say=said.append)
    assert one != two and one.is_file() and two.is_file() and len(said) == 2
    assert "models--allenai--OLMo-2-tiny" in str(one)
    assert gguf_file("allenai/OLMo-2-tiny@stage1-step1000-tokens5B", gguf_type="f16", say=said.append) == one
    assert len(said) == 2


@pytest.mark.parametrize("how", ["SIGINT", "SIGKILL"])
def test_an_interrupted_conversion_leaves_no_gguf_in_the_cache(tmp_path, monkeypatch, how):
    """A conversion stopped (Ctrl-C) or killed while it writes: no GGUF in the cache, and the next run
    converts whole. A checkpoint wide enough (head size 256) that writing takes long enough to be caught."""
    path = build_tiny(tmp_path / "wide", head_dim=256, seed=0)
    cache = tmp_path / "cache"
    monkeypatch.setenv("OLMO2KIT_GGUF_CACHE", str(cache))
    env = {**os.environ}
    proc = subprocess.Popen([str(OLMO2KIT), "generate", "x", "-m", str(path), "--engine", "llamacpp", "--dtype", "fp32",
                             "--max-new-tokens", "2"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list(cache.rglob("*.partial")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    assert list(cache.rglob("*.partial")), "the conversion was not caught while writing"
    proc.send_signal(getattr(signal, how))
    proc.wait(timeout=60)
    time.sleep(1)  # the converter, a child, dies with its parent
    left = _ggufs(cache)
    if how == "SIGINT":
        assert list(cache.rglob("*.partial")) == []  # Ctrl-C cleans up itself
    said = []
    done = gguf_file(str(path), gguf_type="f32", say=said.append)
    assert done.is_file() and list(cache.rglob("*.partial")) == []  # an abandoned partial is removed
    if left:  # on a busy machine the signal can land as the conversion ends: then the GGUF is whole and recorded,
        assert left == [done] and said == []  # so it is served as it is, not converted again
    else:
        assert said  # converted whole, from nothing


def test_export_gguf_reads_back_in_llama_cpp(tiny_instruct_path, tmp_path, cli):
    import gguf
    from llama_cpp import Llama

    out = tmp_path / "tiny-q8.gguf"
    code, stdout, err = cli("export", "gguf", str(tiny_instruct_path), str(out), "--quantize", "q8_0")
    assert code == 0, err
    assert stdout.strip() == str(out) and out.is_file()
    reader = gguf.GGUFReader(str(out))
    assert reader.fields["general.architecture"].contents() == "olmo2"
    assert reader.fields["tokenizer.ggml.pre"].contents() == OLMO2_LLAMA_CPP_PRE
    assert {t.tensor_type.name for t in reader.tensors if t.name.endswith("attn_q.weight")} == {"Q8_0"}
    llama = Llama(model_path=str(out), n_ctx=128, verbose=False)
    try:
        assert len(list(zip(range(4), llama.generate([1, 2, 3], temp=0.0), strict=False))) == 4
    finally:
        llama.close()
    code, _, err = cli("export", "gguf", str(tiny_instruct_path), str(out))
    one_line_error(code, err, "exists: remove it or give another name")


def test_export_gguf_k_quant(tiny_path, tmp_path, cli):
    import gguf

    out = tmp_path / "tiny-q4.gguf"
    code, _, err = cli("export", "gguf", str(tiny_path), str(out), "-q", "q4_k_m")
    assert code == 0, err
    reader = gguf.GGUFReader(str(out))
    assert reader.fields["general.file_type"].contents() == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M


def test_export_ollama_writes_a_gguf_and_a_modelfile(tiny_instruct_path, tmp_path, cli):
    out = tmp_path / "ollama"
    code, stdout, err = cli("export", "ollama", str(tiny_instruct_path), str(out), "-q", "f16")
    assert code == 0, err
    assert "ollama create NAME -f" in err
    modelfile = (out / "Modelfile").read_text()
    lines = modelfile.splitlines()
    gguf_name = lines[0].removeprefix("FROM ./")
    assert gguf_name == "tiny-instruct-f16.gguf" and (out / gguf_name).is_file()
    assert 'PARAMETER stop "<|endoftext|>"' in lines and 'PARAMETER stop "<|user|>"' in lines
    assert "PARAMETER top_p 0.95" in lines and "PARAMETER top_k 50" in lines and "PARAMETER temperature 1" in lines
    assert "PARAMETER num_ctx 1024" in lines
    assert 'TEMPLATE """<|endoftext|>{{ range' in modelfile
    code, _, err = cli("export", "ollama", str(tiny_instruct_path), str(out), "-q", "f16")
    one_line_error(code, err, "give an empty directory")


@pytest.mark.parametrize(("args", "needle"), [
    (["export", "gguf", "{tiny}", "{tmp}/x.gguf", "-q", "q9_k"], "unknown GGUF type 'q9_k'"),
    (["export", "gguf", "{tmp}", "{tmp}/x.gguf"], "holds no config.json: it is not a checkpoint"),
    (["export", "gguf", "{tiny}", "/proc/x.gguf"], "cannot write in /proc"),
    (["export", "gguf", "{tiny}", "{tmp}/x.bin"], "does not end in .gguf"),
    (["export", "ollama", "{tiny}", "/proc/olmo2", "-q", "f16"], "cannot create the directory /proc/olmo2"),
    (["generate", "x", "-m", "{tiny}", "--engine", "llamacpp", "-q", "q9_k"], "not q9_k"),
    (["generate", "x", "-m", "{tmp}", "--engine", "llamacpp"], "holds no config.json: it is not a checkpoint"),
    (["generate", "x", "-m", "{tiny}", "-q", "q8_0", "--engine", "transformers"], "is a GGUF type"),
    (["generate", "x", "-m", "{tiny}", "--engine", "llamacpp", "--compile"], "llama.cpp does not take --compile"),
])
def test_bad_input_is_one_line(tiny_path, tmp_path, cli, args, needle):
    args = [a.format(tiny=tiny_path, tmp=tmp_path) for a in args]
    code, _, err = cli(*args)
    one_line_error(code, err, needle)
    assert _ggufs(tmp_path) == []


def test_a_lora_adapter_is_refused_before_converting(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    from olmo2kit.errors import Olmo2KitError

    with pytest.raises(Olmo2KitError, match="LoRA adapter: merge it"):
        checkpoint_dir(str(adapter))


def test_an_abandoned_partial_is_removed(tiny_path):
    ref, source = checkpoint_dir(str(tiny_path))
    path = cache_path(ref, source, "f16")
    path.parent.mkdir(parents=True, exist_ok=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    abandoned = path.with_name(f".{path.name}.{dead.pid}.partial")
    abandoned.write_bytes(b"GGUF half")
    running = subprocess.Popen(["sleep", "60"])  # another process, converting still: its partial is left alone
    alive = path.with_name(f".{path.name}.{running.pid}.partial")
    alive.write_bytes(b"GGUF half")
    try:
        assert cached_gguf(ref, source, "f16", say=lambda _: None) == path and path.is_file()
        assert not abandoned.exists() and alive.exists()
    finally:
        running.kill()
        alive.unlink(missing_ok=True)


def test_serve_on_llamacpp_answers_the_openai_client(tiny_instruct_path, tiny_instruct, tmp_path):
    import openai
    import torch

    from olmo2kit.inference.generation import generate

    name = str(tiny_instruct_path)
    model, tokenizer = tiny_instruct
    env = {"OLMO2KIT_GGUF_CACHE": str(tmp_path / "cache")}
    with serving("--model", name, "--engine", "llamacpp", "--dtype", "fp32", env=env) as server:
        client = openai.OpenAI(base_url=server.url, api_key="none")
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        reply = client.chat.completions.create(model=name, messages=messages, max_tokens=12, temperature=0)
        expected = generate(*tiny_instruct, messages=messages, do_sample=False, max_new_tokens=12)
        assert reply.choices[0].message.content == expected.text
        assert reply.usage.completion_tokens == expected.new_tokens
        stream = client.completions.create(model=name, prompt="Hello", max_tokens=8, temperature=0, stream=True)
        streamed = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
        assert streamed == generate(*tiny_instruct, "Hello", do_sample=False, max_new_tokens=8).text
        # log probabilities are served on llama.cpp, transformers' within 1e-3 on an f32 GGUF (issue 24)
        scored = client.completions.create(model=name, prompt="Hello", max_tokens=4, temperature=0, logprobs=2)
        logprobs = scored.choices[0].logprobs
        ids = tokenizer("Hello")["input_ids"] + generate(model, tokenizer, "Hello", do_sample=False,
                                                        max_new_tokens=4).token_ids
        with torch.inference_mode():
            direct = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
        expected = [direct[position - 1, ids[position]].item() for position in range(len(ids) - 4, len(ids))]
        assert logprobs.token_logprobs == pytest.approx(expected, abs=1e-3)
        assert [len(top) for top in logprobs.top_logprobs] == [2] * 4


def _with_code(tiny_path: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the tiny checkpoint whose tokenizer names code of its own, which writes a marker when run."""
    import shutil

    path = tmp_path / "with-code"
    shutil.copytree(tiny_path, path)
    marker = tmp_path / "ran"
    (path / "tokenization_evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n\nclass EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path, marker


def test_the_converter_runs_no_code_from_the_checkpoint(tiny_path, tmp_path):
    """Converting a checkpoint that ships tokenizer code runs none of it."""
    path, marker = _with_code(tiny_path, tmp_path)
    assert gguf_file(str(path), gguf_type="f16", say=lambda _: None).is_file()
    assert not marker.exists()


def test_the_converters_tokenizer_loads_refuse_remote_code(tiny_path, tmp_path):
    """llama.cpp's converter asks transformers for trust_remote_code=True for some architectures
    (conversion/base.py); in olmo2kit's conversion process such a request loads no checkpoint code."""
    path, marker = _with_code(tiny_path, tmp_path)
    script = ("from olmo2kit.model.gguf import _no_remote_code\n_no_remote_code()\n"
              "from transformers import AutoTokenizer\n"
              f"print(type(AutoTokenizer.from_pretrained({str(path)!r}, trust_remote_code=True)).__name__)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() != "EvilTokenizer" and not marker.exists()


GO_RENDER = """package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

func main() {
	tpl, _ := os.ReadFile(os.Args[1])
	raw, _ := os.ReadFile(os.Args[2])
	var messages []Message
	if err := json.Unmarshal(raw, &messages); err != nil {
		panic(err)
	}
	t := template.Must(template.New("Modelfile").Parse(string(tpl)))
	if err := t.Execute(os.Stdout, map[string]any{"Messages": messages}); err != nil {
		panic(err)
	}
}
"""


def test_the_modelfile_template_renders_chats_as_transformers(tiny_instruct, tmp_path):
    """The Modelfile's TEMPLATE, run by Go's text/template (the template language ollama uses, with its
    `.Messages`), renders a chat as transformers renders it with the OLMo 2 template. Needs `go` (CI installs it)."""
    import re
    import shutil

    from olmo2kit.model.chat_template import render_chat
    from olmo2kit.model.gguf import ollama_modelfile

    if shutil.which("go") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("go is not installed: CI renders the Modelfile template with Go (.ci/run installs it)")
        pytest.skip("go is not installed")
    modelfile = ollama_modelfile("model.gguf", 4096, {"top_p": 0.95})
    template = re.search(r'^TEMPLATE """(.*?)"""$', modelfile, re.S | re.M).group(1)
    (tmp_path / "template").write_text(template)
    (tmp_path / "main.go").write_text(GO_RENDER)
    env = {**os.environ, "GO111MODULE": "off", "GOCACHE": str(tmp_path / "gocache"), "HOME": str(tmp_path)}
    chats = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Again\n\nplease 🚀"}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
         {"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}, {"role": "user", "content": "z"}],
    ]
    for messages in chats:
        (tmp_path / "messages.json").write_text(json.dumps(messages))
        done = subprocess.run(["go", "run", "main.go", "template", "messages.json"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert done.stdout == render_chat(tiny_instruct[1], messages)
