"""Souping: the average of tiny checkpoints (each of its own seed) against the one computed by hand, weights,
shards, revisions of a repo on the loopback Hub, --compare, and every input a soup refuses."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import one_line_error
from hub import REPO, commit_for
from olmo2kit.errors import Olmo2KitError
from olmo2kit.model.soup import check_weights, soup
from olmo2kit.model.tiny import build_tiny

# Pieces of 1,000 elements: every tensor of the tiny model but the norms is read in several.
PIECE = 1000


def weights_of(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, its shards included."""
    found = {}
    for file in sorted(path.glob("*.safetensors")):
        found.update(load_file(file))
    return found


def rewrite(path: Path, change) -> Path:
    """Replace a checkpoint's tensors by `change(tensors)` (one file, model.safetensors)."""
    tensors = change(weights_of(path))
    for file in path.glob("*.safetensors"):
        file.unlink()
    (path / "model.safetensors.index.json").unlink(missing_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path / "model.safetensors", metadata={"format": "pt"})
    return path


def copy(source: Path, target: Path, change=None) -> Path:
    shutil.copytree(source, target)
    return rewrite(target, change) if change else target


def shard(path: Path, parts: int = 3) -> Path:
    """Split a checkpoint's weights into `parts` files with a model.safetensors.index.json, as the Hub's are."""
    tensors = weights_of(path)
    (path / "model.safetensors").unlink()
    names = list(tensors)
    weight_map = {}
    for k in range(parts):
        file = f"model-{k + 1:05d}-of-{parts:05d}.safetensors"
        chunk = names[k::parts]
        save_file({n: tensors[n] for n in chunk}, path / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    return path


@pytest.fixture(scope="module")
def seeds(tiny_path, tmp_path_factory) -> dict[str, Path]:
    """Three tiny fp32 checkpoints of one architecture and tokenizer, each of its own seed, and their bf16 copies."""
    root = tmp_path_factory.mktemp("soup")
    found = {"a": tiny_path, "b": build_tiny(root / "b", seed=3), "c": build_tiny(root / "c", seed=4)}
    for name in "abc":
        found[f"{name}16"] = copy(found[name], root / f"{name}16",
                                  lambda ts: {k: v.to(torch.bfloat16) for k, v in ts.items()})
    return found


def no_soup_at(output: Path) -> None:
    """Nothing at `output`, and nothing a soup stages beside it."""
    assert not output.exists()
    assert not [p for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.soup")]


def test_the_average_of_two_fp32_checkpoints_is_their_mean_exactly(seeds, tmp_path):
    result = soup([str(seeds["a"]), str(seeds["b"])], tmp_path / "soup", chunk_elements=PIECE)
    a, b, made = weights_of(seeds["a"]), weights_of(seeds["b"]), weights_of(tmp_path / "soup")
    assert made.keys() == a.keys() and result.tensors == len(a)
    for name, tensor in made.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, torch.stack([a[name], b[name]]).mean(0)), name


def test_three_fp32_checkpoints_average_as_computed_by_hand(seeds, tmp_path):
    soup([str(seeds[k]) for k in "abc"], tmp_path / "soup", chunk_elements=PIECE)
    parts = [weights_of(seeds[k]) for k in "abc"]
    made = weights_of(tmp_path / "soup")
    for name, tensor in made.items():
        by_hand = parts[0][name] * (1 / 3) + parts[1][name] * (1 / 3) + parts[2][name] * (1 / 3)  # sums in fp32
        assert torch.equal(tensor, by_hand), name
        exact = torch.stack([p[name].double() for p in parts]).mean(0)
        assert torch.allclose(tensor.double(), exact, rtol=1e-6, atol=1e-7), name


def test_bf16_checkpoints_average_in_fp32_and_save_in_bf16(seeds, tmp_path):
    soup([str(seeds[k]) for k in ("a16", "b16", "c16")], tmp_path / "soup", chunk_elements=PIECE)
    parts = [weights_of(seeds[k]) for k in ("a16", "b16", "c16")]
    made = weights_of(tmp_path / "soup")
    differ_from_bf16_sums = 0
    for name, tensor in made.items():
        assert tensor.dtype == torch.bfloat16, name
        by_hand = sum(p[name].float() * (1 / 3) for p in parts)  # fp32
        assert torch.equal(tensor, by_hand.to(torch.bfloat16)), name
        exact = torch.stack([p[name].double() for p in parts]).mean(0)
        # within bf16 rounding of the exact mean (half a unit in the last place: 8 bits of mantissa), plus what fp32
        # sums lose where the terms cancel (a few units in fp32's last place of the largest term)
        scale = torch.stack([p[name].double().abs() for p in parts]).max(0).values
        assert ((tensor.double() - exact).abs() <= exact.abs() * 2**-8 + scale * 2**-22).all(), name
        in_bf16 = parts[0][name] * (1 / 3) + parts[1][name] * (1 / 3) + parts[2][name] * (1 / 3)
        differ_from_bf16_sums += not torch.equal(tensor, in_bf16)
    assert differ_from_bf16_sums, "sums in bf16 would give the same soup: the test could not tell them apart"


def test_weights_are_applied_normalised_and_recorded(seeds, tmp_path, cli):
    code, out, err = cli("soup", str(seeds["a"]), str(seeds["b"]), "--output", str(tmp_path / "soup"),
                         "--weights", "3,1")
    assert code == 0, err
    assert "normalised to sum 1: 0.75, 0.25" in err
    assert out.strip() == str(tmp_path / "soup")
    a, b, made = weights_of(seeds["a"]), weights_of(seeds["b"]), weights_of(tmp_path / "soup")
    for name, tensor in made.items():
        assert torch.equal(tensor, a[name] * 0.75 + b[name] * 0.25), name
    record = json.loads((tmp_path / "soup" / "soup.json").read_text())
    assert [i["weight"] for i in record["ingredients"]] == [0.75, 0.25]
    assert record["weights_given"] == [3, 1]
    assert [i["directory"] for i in record["ingredients"]] == [str(seeds["a"].resolve()), str(seeds["b"].resolve())]


def test_a_zero_weight_leaves_that_checkpoint_out(seeds, tmp_path):
    soup([str(seeds["a"]), str(seeds["b"])], tmp_path / "soup", weights=[0, 2])
    assert all(torch.equal(t, weights_of(seeds["b"])[n]) for n, t in weights_of(tmp_path / "soup").items())


def test_sharded_checkpoints_soup_into_the_same_shards_and_the_soup_loads_and_generates(seeds, tmp_path):
    from olmo2kit import generate, load

    a, b = shard(copy(seeds["a16"], tmp_path / "a")), shard(copy(seeds["b16"], tmp_path / "b"))
    soup([str(a), str(b)], tmp_path / "soup", chunk_elements=PIECE)
    out = tmp_path / "soup"
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in a.glob("*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == json.loads((a / "model.safetensors.index.json").read_text())["weight_map"]
    made = weights_of(out)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in made.values())
    ta, tb = weights_of(a), weights_of(b)
    assert all(torch.equal(t, ((ta[n].float() + tb[n].float()) / 2).to(torch.bfloat16)) for n, t in made.items())
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (a / name).read_bytes(), name
    model, tokenizer = load(str(out), dtype="fp32", device="cpu")
    assert torch.equal(model.model.embed_tokens.weight, made["model.embed_tokens.weight"].float())
    assert generate(model, tokenizer, "Hello", max_new_tokens=4, do_sample=False).new_tokens >= 1


def test_revisions_of_a_hub_repo_resolve_and_compare_with_main(hub_env, hub, tmp_path, cli):
    # org/repo on the loopback Hub: the two stage-1 branches hold seeds 1 and 2, main holds seed 2 (tests/hub.py).
    first, second = "stage1-step1000-tokens3B", "stage1-step2000-tokens5B"
    code, out, err = cli("soup", f"{REPO}@{first}", f"{REPO}@{second}", "--output", str(tmp_path / "soup"),
                         "--compare", "main", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert [(i["repo"], i["revision"], i["commit"]) for i in report["ingredients"]] == \
        [(REPO, first, commit_for(REPO, first)), (REPO, second, commit_for(REPO, second))]
    record = json.loads((tmp_path / "soup" / "soup.json").read_text())
    assert [i["commit"] for i in record["ingredients"]] == [commit_for(REPO, first), commit_for(REPO, second)]
    assert report["comparison"]["reference"]["revision"] == "main"
    s1, s2 = (weights_of(build_tiny(tmp_path / f"seed{s}", seed=s)) for s in (1, 2))
    made = weights_of(tmp_path / "soup")
    assert all(torch.equal(t, (s1[n] + s2[n]) / 2) for n, t in made.items())
    by_hand = {n: float((made[n] - s2[n]).abs().max()) for n in made}
    assert {t["name"]: t["max_abs_diff"] for t in report["comparison"]["tensors"]} == by_hand
    assert report["comparison"]["max_abs_diff"] == max(by_hand.values()) > 0


def test_a_mistyped_revision_is_one_line_naming_the_nearest(hub_env, hub, tmp_path, cli):
    code, _, err = cli("soup", f"{REPO}@stage1-step1000-tokens3B", f"{REPO}@stage1-step2001-tokens5B",
                       "--output", str(tmp_path / "soup"))
    one_line_error(code, err, "stage1-step2000-tokens5B")
    no_soup_at(tmp_path / "soup")


def test_compare_is_zero_against_the_soup_itself_and_the_largest_difference_otherwise(seeds, tmp_path, cli):
    ingredients = [str(seeds["a16"]), str(seeds["b16"])]
    assert cli("soup", *ingredients, "--output", str(tmp_path / "soup"))[0] == 0
    code, out, err = cli("soup", *ingredients, "--compare", str(tmp_path / "soup"))
    assert code == 0, err
    assert out.splitlines()[-1] == f"largest difference from {tmp_path / 'soup'}: 0"
    assert len(out.splitlines()) == 2 + len(weights_of(seeds["a16"]))  # header, a row a tensor, the largest

    code, out, err = cli("soup", *ingredients, "--compare", str(seeds["a"]), "--json")  # fp32 against the bf16 soup
    assert code == 0, err
    report = json.loads(out)
    assert report["output"] is None and not list(tmp_path.glob(".*"))
    made, reference = weights_of(tmp_path / "soup"), weights_of(seeds["a"])
    by_hand = {n: float((made[n].float() - reference[n]).abs().max()) for n in made}
    assert {t["name"]: t["max_abs_diff"] for t in report["comparison"]["tensors"]} == by_hand
    assert report["comparison"]["max_abs_diff"] == max(by_hand.values())
    assert report["comparison"]["worst_tensor"] == max(by_hand, key=by_hand.get)


def without(name: str):
    return lambda ts: {k: v for k, v in ts.items() if k != name}


def renamed(name: str):
    return lambda ts: {(k + ".renamed" if k == name else k): v for k, v in ts.items()}


def narrowed(name: str):
    return lambda ts: {k: (v[: v.shape[0] // 2] if k == name else v) for k, v in ts.items()}


def edit_json(path: Path, file: str, change) -> Path:
    data = json.loads((path / file).read_text())
    change(data)
    (path / file).write_text(json.dumps(data))
    return path


def swap_two_tokens(data: dict) -> None:
    vocab = data["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[300:302]
    vocab[first], vocab[second] = vocab[second], vocab[first]


def mismatches(seeds, root: Path) -> dict[str, tuple[list[str], str]]:
    """Inputs a soup must refuse: (arguments after the output, a piece of the one-line error)."""
    a, b = str(seeds["a"]), str(seeds["b"])
    wide = build_tiny(root / "wide", seed=5, head_dim=32)
    eps = edit_json(copy(seeds["b"], root / "eps"), "config.json", lambda c: c.update(rms_norm_eps=1e-5))
    tokens = edit_json(copy(seeds["b"], root / "tokens"), "tokenizer.json", swap_two_tokens)
    missing = copy(seeds["b"], root / "missing", without("model.norm.weight"))
    extra = copy(seeds["b"], root / "extra", renamed("model.norm.weight"))
    shape = copy(seeds["b"], root / "shape", narrowed("model.layers.0.mlp.up_proj.weight"))
    adapter = root / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": a}))
    pickled = copy(seeds["b"], root / "pickled")
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    cut = copy(seeds["b"], root / "cut")
    with open(cut / "model.safetensors", "r+b") as f:
        f.truncate(os.path.getsize(cut / "model.safetensors") // 2)
    llama = edit_json(copy(seeds["b"], root / "llama"), "config.json", lambda c: c.update(model_type="llama"))
    return {
        "one checkpoint": ([a], "2 checkpoints or more"),
        "another width": ([a, str(wide)], "another architecture"),
        "another rms_norm_eps": ([a, str(eps)], "rms_norm_eps"),
        "another tokenizer": ([a, str(tokens)], "another tokenizer"),
        "a tensor missing": ([a, str(missing)], "lacks 1 tensors"),
        "a tensor besides": ([a, str(extra)], "lacks 1 tensors"),
        "another shape": ([a, str(shape)], "model.layers.0.mlp.up_proj.weight has shape"),
        "another dtype": ([a, str(seeds["b16"])], "is BF16 in"),
        "a LoRA adapter": ([a, str(adapter)], "olmo2kit merge"),
        "pickled weights": ([a, str(pickled)], "safetensors only"),
        "a cut file": ([a, str(cut)], "not a whole safetensors file"),
        "not OLMo 2": ([a, str(llama)], "not an OLMo 2 checkpoint"),
        "no such directory": ([a, str(root / "nowhere")], "no such directory"),
        "a reference of another shape": ([a, b, "--compare", str(shape)], "has shape"),
        "a bare revision of local checkpoints": ([a, b, "--compare", "main"], "unknown model"),
        "weights, too few": ([a, b, "--weights", "1"], "1 weights for 2 checkpoints"),
        "weights, not numbers": ([a, b, "--weights", "1,x"], "--weights"),
        "weights, empty": ([a, b, "--weights", ""], "--weights"),
        "weights, negative": ([a, b, "--weights", "-1,2"], "0 or more"),
        "weights, nan": ([a, b, "--weights", "nan,1"], "finite"),
        "weights, infinite": ([a, b, "--weights", "inf,1"], "finite"),
        "weights, all 0": ([a, b, "--weights", "0,0"], "add up to 0"),
    }


def test_every_mismatch_is_refused_in_one_line_and_nothing_is_written(seeds, tmp_path, cli):
    root = tmp_path / "inputs"
    root.mkdir()
    for what, (args, needle) in mismatches(seeds, root).items():
        output = tmp_path / "soup"
        code, _, err = cli("soup", *args, "--output", str(output))
        assert needle in one_line_error(code, err, alone=True), what
        no_soup_at(output)


def test_an_output_that_exists_is_refused_and_kept(seeds, tmp_path, cli):
    output = tmp_path / "soup"
    output.mkdir()
    (output / "mine.txt").write_text("keep")
    code, _, err = cli("soup", str(seeds["a"]), str(seeds["b"]), "--output", str(output))
    one_line_error(code, err, "already exists", alone=True)
    assert [p.name for p in output.iterdir()] == ["mine.txt"]
    code, _, err = cli("soup", str(seeds["a"]), str(seeds["b"]))
    one_line_error(code, err, "--output DIR", alone=True)


def test_python_callers_get_the_same_checks(seeds, tmp_path):
    with pytest.raises(Olmo2KitError, match="one weight per checkpoint"):
        soup([str(seeds["a"]), str(seeds["b"])], tmp_path / "soup", weights=[1, 2, 3])
    with pytest.raises(Olmo2KitError, match="finite"):
        soup([str(seeds["a"]), str(seeds["b"])], tmp_path / "soup", weights=[math.inf, 1])
    with pytest.raises(Olmo2KitError, match="a list of checkpoints"):
        soup(str(seeds["a"]), tmp_path / "soup")
    no_soup_at(tmp_path / "soup")
    assert check_weights([1e308, 1e308], 2) == [0.5, 0.5]  # they add up past the largest float
    assert check_weights(None, 4) == [0.25] * 4


def big_checkpoint(tiny: Path, path: Path, value: float, elements: int) -> Path:
    """The tiny checkpoint's config and tokenizer with one large tensor, enough for a soup to take a while."""
    shutil.copytree(tiny, path, ignore=shutil.ignore_patterns("*.safetensors"))
    save_file({"big": torch.full((elements,), value)}, path / "model.safetensors", metadata={"format": "pt"})
    return path


def writing(root: Path, output: Path) -> bool:
    """Whether a soup into `output` has written 8 MB of its weights, in `output` or anywhere beside it."""
    files = [*output.parent.glob(f".{output.name}*/model.safetensors"), output / "model.safetensors"]
    return any(f.exists() and f.stat().st_size > 8 << 20 for f in files)


def test_a_killed_soup_leaves_nothing_at_the_output_and_the_next_run_completes(tiny_path, tmp_path):
    elements = 32 << 20  # 128 MB a checkpoint: the soup runs for most of a second
    a, b = (big_checkpoint(tiny_path, tmp_path / name, v, elements) for name, v in (("a", 1.0), ("b", 3.0)))
    output = tmp_path / "soup"
    command = [sys.executable, "-m", "olmo2kit", "soup", str(a), str(b), "--output", str(output)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not writing(tmp_path, output):  # killed half-way through the soup's one file, wherever it is written
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not output.exists()
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / ".soup.soup-partial").exists()
    made = load_file(output / "model.safetensors")["big"]
    assert made.shape == (elements,) and bool((made == 2.0).all())
