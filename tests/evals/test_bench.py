import json

import pytest

from olmo2kit.errors import Olmo2KitError
from olmo2kit.evals.bench import bench
from olmo2kit.evals.estimate import estimate
from olmo2kit.model.loading import load


def test_bench_reports_consistent_figures(tiny_path, tiny):
    result = bench(str(tiny_path), dtype="fp32", device="cpu", new_tokens=16, prompt_len=8, repeat=2)
    assert result.decode_tokens_per_s > 0 and result.prefill_tokens_per_s > 0 and result.ttft_s > 0
    assert result.ms_per_token == pytest.approx(1000 / result.decode_tokens_per_s)
    assert result.floor_tokens_per_s == pytest.approx(result.bandwidth_gbps * 1e9 / result.bytes_per_step, rel=1e-6)
    assert result.floor_fraction == pytest.approx(result.decode_tokens_per_s / result.floor_tokens_per_s)
    assert result.weight_bytes == tiny[0].get_memory_footprint()


def test_bench_random_init_and_compiled_path():
    result = bench(size="tiny", random_init=True, device="cpu", dtype="fp32", new_tokens=8, prompt_len=4, repeat=1,
                   compile=True, batch_size=2)
    assert result.compile and result.batch_size == 2 and result.decode_tokens_per_s > 0
    assert result.model == "tiny (random init)"


def test_bench_needs_a_size_for_random_init():
    with pytest.raises(Olmo2KitError, match="needs a size"):
        bench(random_init=True)


@pytest.mark.parametrize("quantize", [None, "int8", "nf4"])
def test_estimate_weights_match_loaded_tiny_footprint(tiny_path, quantize):
    model, _ = load(str(tiny_path), dtype="fp32", device="cpu", quantize=quantize)
    weights = estimate(str(tiny_path), dtype="fp32", quantize=quantize).weights_bytes
    assert weights == pytest.approx(model.get_memory_footprint(), rel=0.10)


def test_estimate_published_sizes_and_fit():
    assert estimate("1b", dtype="bf16").weights_bytes / 1e9 == pytest.approx(2.97, rel=0.01)
    assert estimate("allenai/OLMo-2-0425-1B-Instruct", dtype="bf16", quantize="int8").weights_bytes / 1e9 == \
        pytest.approx(1.90, rel=0.02)
    small = estimate("1b", dtype="bf16", context=128, device="cpu")
    assert small.kv_cache_bytes == 2 * 16 * 16 * 128 * 128 * 2  # k and v, layers, kv heads, head dim, tokens, bf16
    assert small.total_bytes == small.weights_bytes + small.kv_cache_bytes + small.working_bytes
    huge = estimate("32b", dtype="fp32", context=4096, batch_size=64, device="cpu")
    assert huge.fits is False


def test_estimate_cli_json_and_errors(cli):
    code, out, err = cli("estimate", "7b", "--quantize", "nf4", "--json")
    assert code == 0
    row = json.loads(out)
    assert row["weights_bytes"] == estimate("7b", quantize="nf4").weights_bytes and row["quantize"] == "nf4"
    code, out, err = cli("estimate", "13b", "--dtype", "bf16", "--device", "cpu")
    assert code == 0 and "KV cache" in out and "weights (bf16)" in out
    assert err.startswith("13b in bf16 on CPU: ") and "fit" in err
    code, _, err = cli("estimate", "nothing-like-this")
    assert code == 2 and err.startswith("error: cannot tell the architecture")
    code, _, err = cli("estimate", "1b", "--device", "tpu")
    assert code == 2 and err == "error: unknown device 'tpu': use auto, cpu, cuda, cuda:N or mps\n"


def test_bench_cli(cli, tiny_path):
    code, out, _ = cli("bench", "--model", str(tiny_path), "--new-tokens", "8", "--prompt-len", "4", "--repeat", "1",
                       "--json")
    result = json.loads(out)
    assert code == 0 and result["new_tokens"] == 8
    assert set(result) == {"model", "device", "dtype", "quantize", "compile", "batch_size", "prompt_len",
                           "new_tokens", "repeat", "load_s", "ttft_s", "prefill_tokens_per_s", "decode_tokens_per_s",
                           "ms_per_token", "peak_memory_gb", "weight_bytes", "bytes_per_step", "bandwidth_gbps",
                           "floor_tokens_per_s", "floor_fraction", "engine", "engine_version"}
    assert result["engine"] == "transformers"
    numbers = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert len(numbers) == 15 and all(v > 0 for v in numbers.values())
    code, out, _ = cli("bench", "--model", str(tiny_path), "--new-tokens", "8", "--repeat", "1")
    assert code == 0 and "bandwidth floor" in out
    code, _, err = cli("bench", "--model", str(tiny_path), "--prompt-len", "100000", "--new-tokens", "2")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err
    assert lines[-1] == "error: --prompt-len is 100000 tokens, which fills the model's 1024-token context"


def test_bench_reports_progress_through_its_callback(tiny_path):
    heard = []
    bench(str(tiny_path), device="cpu", new_tokens=4, prompt_len=4, repeat=2,
          progress=lambda *event: heard.append(event))
    assert heard == [("load", 0, 1), ("runs", 0, 3), ("runs", 1, 3), ("runs", 2, 3), ("runs", 3, 3),
                     ("bandwidth", 0, 1)]


def test_bench_cli_shows_progress_on_stderr_and_keeps_stdout_clean(cli, tiny_path):
    code, out, err = cli("bench", "--model", str(tiny_path), "--new-tokens", "4", "--prompt-len", "4", "--repeat", "2",
                         "--json")
    assert code == 0 and json.loads(out)["repeat"] == 2
    lines = err.splitlines()
    assert lines[0] == f"loading {tiny_path}" and lines[-1] == "measuring memory bandwidth"
    assert lines[1] == "engine: transformers (no CUDA GPU is visible)"  # what --engine auto took
    bars = [line.split("]")[1].split()[0] for line in lines[2:-1]]
    assert bars == ["0/3", "1/3", "2/3", "3/3"] and "a warm-up run, then the timed runs" in lines[2]
    code, _, err = cli("bench", "--size", "tiny", "--random-init", "--device", "cpu", "--new-tokens", "2",
                       "--prompt-len", "2", "--repeat", "1")
    assert code == 0 and err.splitlines()[0] == "loading tiny with random weights"


def test_bytes_per_step_leaves_out_the_input_embeddings_and_adds_the_kv_cache():
    from olmo2kit.evals.bench import bytes_per_step
    from olmo2kit.model.sizes import get_size, weight_bytes

    one_b = get_size("1b")
    weights = weight_bytes(one_b, "bf16")
    embeddings = 100_352 * 2048 * 2  # vocab x hidden, bf16
    kv_per_token = 2 * 16 * 16 * 128 * 2  # keys and values x layers x kv heads x head dim x bf16
    assert bytes_per_step(one_b, weights, 2, 1, 100) == weights - embeddings + 100 * kv_per_token
    assert bytes_per_step(one_b, weights, 2, 16, 100) == weights - embeddings + 16 * 100 * kv_per_token


@pytest.mark.parametrize("quantize", [None, "int8", "nf4"])
def test_estimate_weights_match_loaded_tiny_footprint_in_bf16(tiny_path, quantize):
    model, _ = load(str(tiny_path), device="cpu", dtype="bf16", quantize=quantize)
    weights = estimate(str(tiny_path), dtype="bf16", quantize=quantize).weights_bytes
    assert weights == pytest.approx(model.get_memory_footprint(), rel=0.10)


def test_bench_refuses_what_cannot_fit_before_allocating(cli):
    # 32B in fp32 with a 64 x 4096-token cache: over 260 GB, more than any machine running these tests
    with pytest.raises(Olmo2KitError, match=r"32b in fp32 needs about \d+\.\d GB but CPU has"):
        bench(size="32b", random_init=True, device="cpu", dtype="fp32", batch_size=64, prompt_len=2048,
              new_tokens=2048)
    code, out, err = cli("bench", "--size", "32b", "--random-init", "--device", "cpu", "--dtype", "fp32",
                         "--batch-size", "64", "--prompt-len", "2048", "--new-tokens", "2048")
    assert code == 2 and out == "" and err.startswith("error: 32b in fp32 needs about") and err.count("\n") == 1


@pytest.mark.parametrize("checkpointing", [False, True])
def test_finetune_estimate_counts_what_autograd_saves(tmp_path, checkpointing):
    """The activation formula against torch's own count: every tensor autograd saves in a training forward of
    OLMo 2 under bf16 autocast (weights excluded, bf16 weight copies included), on a GQA config of real shape
    ratios (hidden 256, intermediate 688)."""
    import torch
    from transformers import AutoModelForCausalLM, Olmo2Config

    from olmo2kit.evals.estimate import autocast_copy_bytes, saved_activation_bytes
    from olmo2kit.model.sizes import architecture

    config = Olmo2Config(hidden_size=256, intermediate_size=688, num_attention_heads=8, num_key_value_heads=4,
                         num_hidden_layers=3, vocab_size=4096, tie_word_embeddings=False)
    config.save_pretrained(tmp_path)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    tokens = 384
    ids = torch.randint(0, config.vocab_size, (1, tokens))
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    measured = sum(n for ptr, n in saved.items() if ptr not in weights)
    size = architecture(str(tmp_path))
    # With checkpointing the layers' weight copies are recomputed, not saved: only the lm_head's is.
    copies = 2 * size.vocab_size * size.hidden_size if checkpointing else autocast_copy_bytes(size)
    assert measured == pytest.approx(saved_activation_bytes(size, tokens, checkpointing) + copies, rel=0.05)


def test_finetune_estimate_shards_and_finds_the_fewest_gpus():
    from olmo2kit.evals.estimate import finetune_estimate
    from olmo2kit.model.sizes import get_size

    params = get_size("32b").params
    gpu = 80 * 10**9
    ddp = finetune_estimate("32b", processes=16, device_bytes=gpu)
    assert (ddp.weights_bytes, ddp.gradients_bytes, ddp.optimizer_bytes) == (4 * params, 4 * params, 8 * params)
    assert ddp.fits is False and ddp.fewest_processes is None
    plan = dict(method="full", fsdp=True, mixed_precision=True, gradient_checkpointing=True, device_bytes=gpu)
    sharded = finetune_estimate("32b", processes=16, **plan)
    assert sharded.optimizer_bytes == 8 * params // 16 and sharded.fits is True
    assert sharded.total_bytes == sum(getattr(sharded, f"{part}_bytes") for part in
                                      ("weights", "gradients", "optimizer", "activations", "working"))
    fewest = sharded.fewest_processes
    assert finetune_estimate("32b", processes=fewest, **plan).fits is True
    assert finetune_estimate("32b", processes=fewest - 1, **plan).fits is False
    # autocast keeps a bf16 copy of every weight through the pass; FSDP's bf16 policy does not.
    autocast = finetune_estimate("32b", processes=16, **{**plan, "mixed_precision": False})
    assert autocast.activations_bytes - sharded.activations_bytes >= 2 * get_size("32b").linear_params
    assert finetune_estimate("7b", method="qlora", device_bytes=gpu).weights_bytes < \
        finetune_estimate("7b", method="lora", device_bytes=gpu).weights_bytes < 2.1 * get_size("7b").params


def test_estimate_finetune_cli(cli):
    code, out, err = cli("estimate", "32b", "--finetune", "full", "--processes", "16", "--fsdp", "--mixed-precision",
                         "--gradient-checkpointing", "--device-memory", "80")
    assert code == 0 and "optimizer (AdamW)" in out and "available on GPU               80.00 GB" in out
    assert err.startswith("32b full fine-tune on 16 process(es), FSDP: fits (") and "fewest FSDP processes" in err
    code, out, _ = cli("estimate", "7b", "--finetune", "lora", "--json", "--device-memory", "24")
    assert code == 0 and json.loads(out)["method"] == "lora"
    for args, message in [
        (("--fsdp",), "error: --processes, --fsdp, --mixed-precision, --gradient-checkpointing and --device-memory "
                      "size a training process: give them with --finetune full|lora|qlora\n"),
        (("--finetune", "dpo"), "error: unknown fine-tuning method 'dpo': use one of full, lora, qlora\n"),
        (("--finetune", "full", "--mixed-precision"),
         "error: mixed precision here is FSDP's bf16 policy: give it with --fsdp\n"),
        (("--finetune", "full", "--device-memory", "nan"),
         "error: --device-memory nan: give the GB of one GPU, e.g. 80 for an H100\n"),
        (("--finetune", "full", "--processes", "0"),
         "error: processes, sequence length, batch size and LoRA rank must be at least 1\n"),
    ]:
        code, _, err = cli("estimate", "7b", *args)
        assert (code, err) == (2, message)
