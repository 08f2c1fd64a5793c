"""vLLM as an engine, through the Python API: token for token against transformers in fp32 (greedy, batched,
chat, stop strings, streaming, chat sessions, batch jobs), its scores against transformers' logits, and the
engine choice and its refusals."""

import json
import re

import pytest
import torch

from olmo2kit.errors import Olmo2KitError
from olmo2kit.evals.perplexity import perplexity
from olmo2kit.inference.chat import ChatSession
from olmo2kit.inference.engines import TransformersEngine, VllmEngine, engine_for
from olmo2kit.inference.generation import generate, stream_generate
from olmo2kit.inference.jobs import run_job
from olmo2kit.model import engines as engines_module
from olmo2kit.model import vllm as vllm_module
from olmo2kit.model.engines import choose_engine, engine_info
from olmo2kit.model.vllm import VllmOptions, vllm_refusal

from .conftest import stop_inside

PROMPT = "Language modeling is "
# Three lengths, so that transformers pads two of them on the left.
PROMPTS = ["Hi", PROMPT, "The quick brown fox jumps over the lazy dog. OLMo 2 is a family of"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]


def same_generation(on_vllm, on_transformers):
    assert on_vllm.token_ids == on_transformers.token_ids
    assert on_vllm.text == on_transformers.text
    assert (on_vllm.prompt_tokens, on_vllm.new_tokens, on_vllm.finish_reason) == (
        on_transformers.prompt_tokens, on_transformers.new_tokens, on_transformers.finish_reason)


def test_greedy_one_prompt_matches_transformers(vllm_tiny64, tiny64):
    on_vllm = generate(*vllm_tiny64, PROMPT, do_sample=False, max_new_tokens=20)
    on_transformers = generate(*tiny64, PROMPT, do_sample=False, max_new_tokens=20)
    same_generation(on_vllm, on_transformers)
    assert on_vllm.new_tokens == 20 and on_vllm.finish_reason == "length"


def test_greedy_batch_of_different_lengths_matches_transformers(vllm_tiny64, tiny64):
    tokenizer = tiny64[1]
    assert len({len(tokenizer(p)["input_ids"]) for p in PROMPTS}) == 3
    on_vllm = generate(*vllm_tiny64, PROMPTS, do_sample=False, max_new_tokens=16)
    on_transformers = generate(*tiny64, PROMPTS, do_sample=False, max_new_tokens=16)
    assert len(on_vllm) == len(on_transformers) == 3
    for row_vllm, row_transformers in zip(on_vllm, on_transformers, strict=True):
        same_generation(row_vllm, row_transformers)
    assert len({tuple(row.token_ids) for row in on_vllm}) == 3  # each row its own continuation, in order


def test_chat_messages_match_transformers(vllm_tiny64_instruct, tiny64_instruct):
    on_vllm = generate(*vllm_tiny64_instruct, messages=CHAT, do_sample=False, max_new_tokens=16)
    on_transformers = generate(*tiny64_instruct, messages=CHAT, do_sample=False, max_new_tokens=16)
    same_generation(on_vllm, on_transformers)
    assert on_vllm.new_tokens > 0


def test_stop_string_cuts_as_on_transformers(vllm_tiny64, tiny64):
    full = generate(*tiny64, PROMPT, do_sample=False, max_new_tokens=30)
    stop = stop_inside(full.text)
    on_vllm = generate(*vllm_tiny64, PROMPT, do_sample=False, max_new_tokens=30, stop=[stop])
    on_transformers = generate(*tiny64, PROMPT, do_sample=False, max_new_tokens=30, stop=[stop])
    same_generation(on_vllm, on_transformers)
    assert on_vllm.finish_reason == "stop"
    assert on_vllm.text == full.text[: full.text.find(stop)] and len(on_vllm.text) < len(full.text)
    assert on_vllm.new_tokens < full.new_tokens


@pytest.mark.parametrize("with_stop", [False, True])
def test_stream_chunks_join_to_generate(vllm_tiny64, tiny64, with_stop):
    stop = [stop_inside(generate(*tiny64, PROMPT, do_sample=False, max_new_tokens=24).text)] if with_stop else []
    chunks = list(stream_generate(*vllm_tiny64, PROMPT, do_sample=False, max_new_tokens=24, stop=stop))
    whole = generate(*vllm_tiny64, PROMPT, do_sample=False, max_new_tokens=24, stop=stop)
    assert len(chunks) > 1  # streamed, not handed over at the end
    assert "".join(c.text for c in chunks) == whole.text
    assert [t for c in chunks for t in c.token_ids] == whole.token_ids
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].finish_reason == whole.finish_reason == ("stop" if with_stop else "length")
    same_generation(whole, generate(*tiny64, PROMPT, do_sample=False, max_new_tokens=24, stop=stop))


def test_chat_session_of_two_turns_matches_transformers(vllm_tiny64_instruct, tiny64_instruct):
    sessions = [ChatSession(*loaded, system="Be brief.", do_sample=False, max_new_tokens=12)
                for loaded in (vllm_tiny64_instruct, tiny64_instruct)]
    for text in ("Hi", "What is OLMo?"):
        on_vllm, on_transformers = (session.reply(text) for session in sessions)
        same_generation(on_vllm, on_transformers)
    assert sessions[0].messages == sessions[1].messages
    assert [m["role"] for m in sessions[0].messages] == ["system", "user", "assistant", "user", "assistant"]
    assert not sessions[0].reuse_cache and sessions[0].reused_tokens == 0  # vLLM keeps its own cache


def test_scored_nll_matches_transformers_log_softmax(vllm_tiny64, tiny64):
    model, tokenizer = tiny64
    ids = tokenizer(PROMPTS[2])["input_ids"]
    with torch.inference_mode():
        logprobs = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
    expected = [float(logprobs[k - 1, ids[k]]) for k in range(1, len(ids))]  # each token given those before it
    engine = VllmEngine(*vllm_tiny64)
    # A window of k + 1 tokens scored past its first k is the log-probability of token k alone.
    per_token = engine.scored_nll([(ids[: k + 1], k) for k in range(1, len(ids))])
    assert per_token == pytest.approx([-lp for lp in expected], abs=1e-4)
    whole, tail = engine.scored_nll([(ids, 1), (ids, 5)])
    assert whole == pytest.approx(-sum(expected), abs=1e-3)
    assert tail == pytest.approx(-sum(expected[4:]), abs=1e-3)
    assert TransformersEngine(*tiny64).scored_nll([(ids, 5)]) == pytest.approx([tail], abs=1e-3)


def test_perplexity_windows_default_to_what_vllm_scores(vllm_tiny64, tiny64):
    """vLLM scores a window through a request that generates one token, so a window holds at most the context
    less one: the default windows are those, and the context itself is refused in one line."""
    text = " ".join(PROMPTS) * 80  # well past the 1,024-token context
    on_vllm = perplexity(*vllm_tiny64, text)
    on_transformers = perplexity(*tiny64, text, max_length=1023)
    assert on_vllm.tokens > 2 * 1024 and on_vllm.windows == on_transformers.windows > 2
    assert on_vllm.perplexity == pytest.approx(on_transformers.perplexity, rel=1e-4)
    with pytest.raises(Olmo2KitError, match=r"at most 1023, the model's context \(1024\) less the token vllm "):
        perplexity(*vllm_tiny64, text, max_length=1024)


def test_seeded_sampling_on_vllm_is_repeatable(vllm_tiny64):
    def sample(seed):
        return generate(*vllm_tiny64, PROMPT, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, seed=seed,
                        max_new_tokens=16).token_ids

    first = sample(7)
    assert len(first) == 16
    assert sample(7) == first
    assert sample(8) != first


def test_engine_info_names_the_engine_and_its_version(vllm_tiny64, tiny64):
    import transformers

    info = engine_info(vllm_tiny64[0])
    assert set(info) == {"engine", "engine_version"} and info["engine"] == "vllm"
    assert re.match(r"\d+\.\d+", info["engine_version"]), info
    assert engine_info(tiny64[0]) == {"engine": "transformers", "engine_version": transformers.__version__}


@pytest.mark.parametrize("option", [{"compile": True}, {"cache": object()}, {"draft_model": object()}])
def test_vllm_takes_no_compile_draft_or_cache(vllm_tiny64, option):
    assert isinstance(engine_for(*vllm_tiny64), VllmEngine)
    with pytest.raises(Olmo2KitError, match="vLLM"):
        engine_for(*vllm_tiny64, **option)


@pytest.mark.parametrize(("gpus", "device", "chosen", "said"), [
    (0, "auto", "transformers", "engine: transformers (no CUDA GPU is visible)"),
    (0, "cpu", "transformers", "engine: transformers (--device cpu)"),
    (1, "auto", "vllm", "engine: vllm"),
])
def test_auto_takes_vllm_only_with_a_gpu(tiny64_path, monkeypatch, gpus, device, chosen, said):
    monkeypatch.setattr(vllm_module, "visible_gpus", lambda: gpus)
    monkeypatch.setattr(engines_module, "visible_gpus", lambda: gpus)
    told = []
    assert choose_engine("auto", str(tiny64_path), device=device, say=told.append) == chosen
    assert told == [said]


def test_auto_on_this_machine(tiny64_path):
    told = []
    chosen = choose_engine("auto", str(tiny64_path), say=told.append)
    assert chosen == ("vllm" if torch.cuda.is_available() else "transformers"), told


@pytest.mark.parametrize(("engine", "options", "needle"), [
    ("vllm", {"quantize": "nf4"}, "nf4"),
    ("vllm", {"quantize": "int8"}, "int8"),
    ("vllm", {"unsupported": "--compile"}, "--compile"),
    ("vllm", {"device": "cuda:1"}, "CUDA_VISIBLE_DEVICES"),
    ("bogus", {}, "unknown engine"),
])
def test_choose_engine_refuses(tiny64_path, engine, options, needle):
    with pytest.raises(Olmo2KitError, match=re.escape(needle)):
        choose_engine(engine, str(tiny64_path), **options)


def test_choose_engine_explicit(tiny64_path):
    assert choose_engine("vllm", str(tiny64_path), device="cpu") == "vllm"
    assert choose_engine("transformers", str(tiny64_path), quantize="nf4") == "transformers"


@pytest.mark.parametrize(("options", "needle"), [
    ({"tensor_parallel_size": 0}, "--tensor-parallel-size"),
    ({"pipeline_parallel_size": -1}, "--pipeline-parallel-size"),
    ({"data_parallel_size": 0}, "--data-parallel-size"),
    ({"gpu_memory_utilization": 0.0}, "--gpu-memory-utilization"),
    ({"gpu_memory_utilization": 1.5}, "--gpu-memory-utilization"),
    ({"max_model_len": 1}, "--max-model-len"),
])
def test_vllm_options_are_checked(options, needle):
    with pytest.raises(Olmo2KitError, match=re.escape(needle)):
        VllmOptions(**options)


def test_vllm_options_count_devices():
    assert VllmOptions().devices == 1
    assert VllmOptions(tensor_parallel_size=2, pipeline_parallel_size=3, data_parallel_size=2).devices == 12


def test_vllm_refusal(tiny64_path, tmp_path):
    path = str(tiny64_path)
    assert vllm_refusal(path, quantize=None, device="cpu") is None
    two = vllm_refusal(path, quantize=None, device="cpu", options=VllmOptions(tensor_parallel_size=2))
    assert isinstance(two, str) and "2 GPUs" in two and "\n" not in two
    assert "nf4" in vllm_refusal(path, quantize="nf4", device="cpu")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    assert "LoRA adapter" in vllm_refusal(str(adapter), quantize=None, device="cpu")


def test_job_on_vllm_matches_transformers(vllm_tiny64_instruct, tiny64_instruct, tmp_path):
    lines = [{"id": "a", "prompt": PROMPTS[0]}, {"id": "b", "prompt": PROMPTS[2]},
             {"id": "c", "messages": CHAT[1:]}, {"id": "d", "prompt": PROMPT, "max_new_tokens": 4}]
    source = tmp_path / "input.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    results = {}
    for name, loaded in (("vllm", vllm_tiny64_instruct), ("transformers", tiny64_instruct)):
        output = tmp_path / f"{name}.jsonl"
        summary = run_job(*loaded, source, output, batch_size=3, do_sample=False, max_new_tokens=8)
        assert (summary.total, summary.written, summary.skipped) == (4, 4, [])
        results[name] = read_lines(output)
    on_vllm, on_transformers = results["vllm"], results["transformers"]
    assert [r["id"] for r in on_vllm] == [r["id"] for r in on_transformers] == ["a", "b", "c", "d"]
    for row_vllm, row_transformers in zip(on_vllm, on_transformers, strict=True):
        assert same_result(row_vllm, row_transformers)
        assert row_vllm["engine"] == "vllm" and row_transformers["engine"] == "transformers"
        assert row_vllm["engine_version"] == engine_info(vllm_tiny64_instruct[0])["engine_version"]
    assert on_vllm[3]["options"]["max_new_tokens"] == 4 and on_vllm[3]["new_tokens"] <= 4


def test_job_started_on_transformers_resumes_on_vllm(vllm_tiny64_instruct, tiny64_instruct, tmp_path):
    source = tmp_path / "input.jsonl"
    source.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    whole, resumed = tmp_path / "whole.jsonl", tmp_path / "resumed.jsonl"
    run_job(*tiny64_instruct, source, whole, do_sample=False, max_new_tokens=8)
    resumed.write_text("".join(whole.read_text().splitlines(keepends=True)[:2]))
    summary = run_job(*vllm_tiny64_instruct, source, resumed, do_sample=False, max_new_tokens=8)
    assert (summary.already_done, summary.written) == (2, 1)
    rows = read_lines(resumed)
    assert [r["engine"] for r in rows] == ["transformers", "transformers", "vllm"]
    assert all(same_result(a, b) for a, b in zip(rows, read_lines(whole), strict=True))


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def same_result(row, other) -> bool:
    """Two result lines of one request agree: what was asked and what was generated."""
    keys = ("id", "model", "revision", "input", "options", "request_sha256", "text", "token_ids", "prompt_tokens",
            "new_tokens", "finish_reason")
    return {k: row[k] for k in keys} == {k: other[k] for k in keys}
