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
from olmo2kit.model.tiny import build_tiny, write_olmo2_sized_tokenizer

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
    """Nothing at `output`, and nothing a soup stages beside it (its lock file aside, which stays, as each of
    files.output_lock's does)."""
    assert not output.exists()
    assert not [p for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.")
                and p.name != f".{output.name}.soup.lock"]


def olmo_soup(parts: list[dict[str, torch.Tensor]], name: str) -> torch.Tensor:
    """One tensor souped as OLMo's own script does (allenai/OLMo, scripts/olmo_soup.py at 58a9e5b0): from zeros,
    `+= x / N` in the checkpoints' order, here in fp32."""
    average = torch.zeros_like(parts[0][name], dtype=torch.float32)
    for p in parts:
        average += p[name].float() / len(parts)
    return average


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
    differ_from_products = 0
    for name, tensor in made.items():
        assert torch.equal(tensor, olmo_soup(parts, name)), name
        exact = torch.stack([p[name].double() for p in parts]).mean(0)
        assert torch.allclose(tensor.double(), exact, rtol=1e-6, atol=1e-7), name
        differ_from_products += not torch.equal(tensor, sum(p[name] * (1 / 3) for p in parts))
    assert differ_from_products, "x * (1/3) would give the same soup: the test could not tell it from x / 3"


def test_bf16_checkpoints_average_in_fp32_and_save_in_bf16(seeds, tmp_path):
    soup([str(seeds[k]) for k in ("a16", "b16", "c16")], tmp_path / "soup", chunk_elements=PIECE)
    parts = [weights_of(seeds[k]) for k in ("a16", "b16", "c16")]
    made = weights_of(tmp_path / "soup")
    differ_from_bf16_sums = 0
    for name, tensor in made.items():
        assert tensor.dtype == torch.bfloat16, name
        assert torch.equal(tensor, olmo_soup(parts, name).to(torch.bfloat16)), name
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
    assert report["output"] is None and [p.name for p in tmp_path.glob(".*")] == [".soup.soup.lock"]  # the first run's
    made, reference = weights_of(tmp_path / "soup"), weights_of(seeds["a"])
    by_hand = {n: float((made[n].float() - reference[n]).abs().max()) for n in made}
    assert {t["name"]: t["max_abs_diff"] for t in report["comparison"]["tensors"]} == by_hand
    assert report["comparison"]["max_abs_diff"] == max(by_hand.values())
    assert report["comparison"]["worst_tensor"] == max(by_hand, key=by_hand.get)


def test_compare_is_zero_against_the_soup_olmos_own_script_makes(seeds, tmp_path, cli):
    parts = [weights_of(seeds[k]) for k in "abc"]
    reference = copy(seeds["a"], tmp_path / "reference", lambda ts: {n: olmo_soup(parts, n) for n in ts})
    for weights in ([], ["--weights", "2,2,2"]):
        code, out, err = cli("soup", *(str(seeds[k]) for k in "abc"), "--compare", str(reference), *weights)
        assert code == 0, err
        assert out.splitlines()[-1] == f"largest difference from {reference}: 0", weights


def test_cached_revisions_soup_offline_and_with_the_hub_down(hub_env, hub, tmp_path, cli, monkeypatch):
    from huggingface_hub import constants

    from olmo2kit.model.hub_cache import download

    first, second = "stage1-step1000-tokens3B", "stage1-step2000-tokens5B"
    for revision in (first, second, "main"):
        download(REPO, revision)
    expected = {c: commit_for(REPO, r) for c, r in (("first", first), ("second", second))}
    for where, setting in (("offline", ("HF_HUB_OFFLINE", True)), ("down", ("ENDPOINT", "http://127.0.0.1:9"))):
        with monkeypatch.context() as m:
            m.setattr(constants, *setting)
            output = tmp_path / where
            code, out, err = cli("soup", f"{REPO}@{first}", f"{REPO}@{second}", "--output", str(output),
                                 "--compare", "main", "--json")
            assert code == 0, (where, err)
            report = json.loads(out)
            assert [i["commit"] for i in report["ingredients"]] == [expected["first"], expected["second"]], where
            assert report["comparison"]["max_abs_diff"] > 0 and (output / "model.safetensors").is_file(), where
            code, _, err = cli("soup", f"{REPO}@{first}", f"{REPO}@{'0' * 40}", "--output",  # a commit not cached
                               str(tmp_path / f"{where}-uncached"))
            one_line_error(code, err, "not in the local cache")


def test_the_lock_is_held_across_the_rename_and_a_second_run_is_refused(seeds, tmp_path, monkeypatch):
    from olmo2kit.files import output_lock

    output = tmp_path / "soup"
    lock_name = output.with_name("soup.soup")  # the lock beside the output: .soup.soup.lock
    with output_lock(lock_name, option="--output"):  # another run holds it
        with pytest.raises(Olmo2KitError, match="in use by another olmo2kit run"):
            soup([str(seeds["a"]), str(seeds["b"])], output)
    no_soup_at(output)

    real_replace, held = os.replace, []

    def replace(source, target, *args, **kwargs):
        if str(source).endswith(".partial"):
            try:
                with output_lock(lock_name, option="--output"):
                    held.append(False)
            except Olmo2KitError:
                held.append(True)
        return real_replace(source, target, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    soup([str(seeds["a"]), str(seeds["b"])], output)
    assert held == [True] and (output / "model.safetensors").is_file()


def dead_pid() -> int:
    """The process id of a process that has ended."""
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


def test_what_a_killed_run_staged_is_cleared_before_the_free_space_is_counted(seeds, tmp_path, monkeypatch):
    output = tmp_path / "soup"
    staging = tmp_path / f".soup.{dead_pid()}.x1.partial"  # as files.staged_output_dir names it
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"\0" * 1000)  # what the killed run wrote
    real_usage, staged_then = shutil.disk_usage, []

    def disk_usage(path):
        staged_then.append(staging.exists())
        return real_usage(path)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    soup([str(seeds["a"]), str(seeds["b"])], output)
    assert staged_then == [False] and not staging.exists()


HERE, ABOVE = "is the current directory (or holds it)", "exists: give a new directory"  # above: not empty


@pytest.mark.parametrize(("output", "needle"), [(".", HERE), ("", HERE), ("./.", HERE), ("..", ABOVE), ("/", ABOVE)])
def test_an_output_naming_the_current_directory_or_above_is_one_line_before_any_work(seeds, tmp_path, cli,
                                                                                     monkeypatch, output, needle):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    code, _, err = cli("soup", str(seeds["a"]), str(tmp_path / "nowhere"), "--output", output)  # refused first
    one_line_error(code, err, needle, alone=True)
    assert not list(empty.iterdir()) and not list(tmp_path.glob(".*"))


def test_a_relative_output_is_made_where_it_is_named(seeds, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = soup([str(seeds["a"]), str(seeds["b"])], "made/./soup/")
    assert result.output == tmp_path / "made" / "soup" and (tmp_path / "made" / "soup" / "model.safetensors").is_file()
    assert (tmp_path / "made" / "soup").stat().st_mode & 0o777 == 0o755  # readable by all, as a saved checkpoint


def test_the_help_examples_are_whole_commands(cli):
    code, out, _ = cli("soup", "--help")
    assert code == 0
    lines = [line.strip() for line in out.split("Examples:")[1].split("╭")[0].splitlines()]
    lines = [line.strip("│ ") for line in lines if line.strip("│ ")]
    commands, joined = [], ""
    for line in lines:
        if not line.startswith("olmo2kit") and not joined:  # a line that does not continue a command: not copyable
            pytest.fail(f"{line!r} continues no command (the line before it ends without a backslash)")
        joined += line.removesuffix("\\").strip() + " "
        if not line.endswith("\\"):
            commands.append(joined.strip())
            joined = ""
    assert [c.split(" --output")[0].count("@stage2") for c in commands] == [3, 0]


MEMORY = """
import sys
from pathlib import Path

import torch  # noqa: F401  (before the baseline, as the benchmark does: its memory is not the soup's)

from olmo2kit.model.soup import soup


def kb(key):
    return next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith(key + ":"))


before = kb("VmRSS")
soup(sys.argv[1:3], sys.argv[3], say=lambda message: None)
print((kb("VmHWM") - before) << 10)
"""


def test_tokenizers_of_olmo2s_size_are_compared_in_little_memory(tiny_path, tmp_path):
    write_olmo2_sized_tokenizer(tmp_path / "tokenizer.json")
    a, b = copy(tiny_path, tmp_path / "a"), copy(tiny_path, tmp_path / "b")
    for path in (a, b):
        shutil.copyfile(tmp_path / "tokenizer.json", path / "tokenizer.json")
    done = subprocess.run([sys.executable, "-c", MEMORY, str(a), str(b), str(tmp_path / "soup")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    added = int(done.stdout.split()[-1])
    assert added < 30e6, f"the soup of two tiny checkpoints took {added / 1e6:.0f} MB"  # parsing both: 120 MB


def test_a_tokenizer_saved_otherwise_with_the_same_vocabulary_is_the_same_and_another_is_not(seeds, tmp_path):
    data = json.loads((seeds["a"] / "tokenizer.json").read_text())
    other = copy(seeds["b"], tmp_path / "b")
    (other / "tokenizer.json").write_text(json.dumps(data, indent=4, ensure_ascii=True))  # other bytes, same tokens
    soup([str(seeds["a"]), str(other)], tmp_path / "soup")
    data["added_tokens"][0]["id"] += 1000
    (other / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(Olmo2KitError, match="another tokenizer"):
        soup([str(seeds["a"]), str(other)], tmp_path / "soup2")


def test_configs_that_differ_in_bookkeeping_or_in_how_they_say_the_same_are_souped(seeds, tmp_path):
    def older(config: dict) -> None:  # as transformers 4 saved it, with other bookkeeping
        rope = config.pop("rope_parameters")
        config.update(rope_theta=rope["rope_theta"], rope_scaling=None, torch_dtype="bfloat16",
                      transformers_version="4.48.0", architectures=["Olmo2Model"], use_cache=False)
        config.pop("hidden_act", None)  # transformers' default, silu

    other = edit_json(copy(seeds["b"], tmp_path / "b"), "config.json", older)
    soup([str(seeds["a"]), str(other)], tmp_path / "soup")
    assert (tmp_path / "soup" / "model.safetensors").is_file()


def without(name: str):
    return lambda ts: {k: v for k, v in ts.items() if k != name}


def added(name: str):
    return lambda ts: {**ts, name: torch.zeros(4)}


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


def reheader(path: Path, change) -> Path:
    """Rewrite a checkpoint's model.safetensors as `change(header, data)` returns them."""
    file = path / "model.safetensors"
    raw = file.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header, data = change(json.loads(raw[8:8 + length]), raw[8 + length:])
    encoded = json.dumps(header).encode()
    file.write_bytes(len(encoded).to_bytes(8, "little") + encoded + data)
    return path


def by_offset(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def shifted(header: dict, by: int, after: int = -1) -> dict:
    """`header` with the tensors that start past byte `after` moved `by` bytes."""
    return {k: v if k == "__metadata__" or v["data_offsets"][0] <= after else
            {**v, "data_offsets": [o + by for o in v["data_offsets"]]} for k, v in header.items()}


def overlapping(header: dict, data: bytes) -> tuple[dict, bytes]:
    """The last tensor starting 4 bytes into the one before it (and the data 4 bytes shorter)."""
    last = by_offset(header)[-1]
    start = header[last]["data_offsets"][0]
    return shifted(header, -4, after=start - 1), data[:-4]


# Files safetensors itself refuses (safetensors/src/tensor.rs, Metadata::validate): the tests check it does.
HEADER_DAMAGE = {
    "overlapping tensors": overlapping,
    "a gap before the first tensor": lambda h, d: (shifted(h, 8), b"\0" * 8 + d),
    "bytes after the last tensor": lambda h, d: (h, d + b"\0" * 8),
    "metadata of numbers": lambda h, d: ({**h, "__metadata__": {"format": 1}}, d),
    "metadata not a map": lambda h, d: ({**h, "__metadata__": ["pt"]}, d),
}


def test_safetensors_refuses_the_damaged_headers_too(seeds, tmp_path):
    from safetensors import safe_open

    for what, change in HEADER_DAMAGE.items():
        path = reheader(copy(seeds["b"], tmp_path / what.replace(" ", "-")), change)
        with pytest.raises(Exception):  # noqa: B017 (safetensors raises its own SafetensorError, or a plain one)
            with safe_open(path / "model.safetensors", framework="pt") as f:
                [f.get_tensor(k) for k in f.keys()]
            pytest.fail(f"safetensors reads a file with {what}")


def mismatches(seeds, root: Path) -> dict[str, tuple[list[str], str]]:
    """Inputs a soup must refuse: (arguments after the output, a piece of the one-line error)."""
    a, b = str(seeds["a"]), str(seeds["b"])
    wide = build_tiny(root / "wide", seed=5, head_dim=32)
    eps = edit_json(copy(seeds["b"], root / "eps"), "config.json", lambda c: c.update(rms_norm_eps=1e-5))
    act = edit_json(copy(seeds["b"], root / "act"), "config.json", lambda c: c.update(hidden_act="gelu"))
    scaled = edit_json(copy(seeds["b"], root / "scaled"), "config.json",
                       lambda c: c["rope_parameters"].update(rope_type="linear", factor=2.0))
    tokens = edit_json(copy(seeds["b"], root / "tokens"), "tokenizer.json", swap_two_tokens)
    missing = copy(seeds["b"], root / "missing", without("model.norm.weight"))
    extra = copy(seeds["b"], root / "extra", added("model.extra.weight"))
    shape = copy(seeds["b"], root / "shape", narrowed("model.layers.0.mlp.up_proj.weight"))
    adapter = root / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": a}))
    pickled = copy(seeds["b"], root / "pickled")
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    cut = copy(seeds["b"], root / "cut")
    with open(cut / "model.safetensors", "r+b") as f:
        f.truncate(os.path.getsize(cut / "model.safetensors") // 2)
    damaged = {what: reheader(copy(seeds["b"], root / what.replace(" ", "-")), change)
               for what, change in HEADER_DAMAGE.items()}
    llama = edit_json(copy(seeds["b"], root / "llama"), "config.json", lambda c: c.update(model_type="llama"))
    return {
        "one checkpoint": ([a], "2 checkpoints or more"),
        "another width": ([a, str(wide)], "another architecture"),
        "another rms_norm_eps": ([a, str(eps)], "rms_norm_eps"),
        "another hidden_act": ([a, str(act)], "(hidden_act 'gelu' against 'silu')"),
        "another rope scaling": ([a, str(scaled)], "(rope_parameters {"),
        "another tokenizer": ([a, str(tokens)], "another tokenizer"),
        "a tensor missing": ([a, str(missing)], "lacks 1 tensors"),
        "a tensor besides": ([a, str(extra)], "has 1 tensors besides those of"),
        "another shape": ([a, str(shape)], "model.layers.0.mlp.up_proj.weight has shape"),
        "another dtype": ([a, str(seeds["b16"])], "is BF16 in"),
        "a LoRA adapter": ([a, str(adapter)], "olmo2kit merge"),
        "pickled weights": ([a, str(pickled)], "safetensors only"),
        "a cut file": ([a, str(cut)], "not a whole safetensors file"),
        "not OLMo 2": ([a, str(llama)], "not an OLMo 2 checkpoint"),
        **{what: ([a, str(path)], "not a whole safetensors file") for what, path in damaged.items()},
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
        output = tmp_path / "new" / "soup"
        code, _, err = cli("soup", *args, "--output", str(output))
        assert needle in one_line_error(code, err, alone=True), what
        assert not output.parent.exists(), what  # not even the folder it would have gone in


def test_an_output_that_exists_is_refused_and_kept(seeds, tmp_path, cli):
    output = tmp_path / "soup"
    output.mkdir()
    (output / "mine.txt").write_text("keep")
    code, _, err = cli("soup", str(seeds["a"]), str(seeds["b"]), "--output", str(output))
    one_line_error(code, err, "exists: give a new directory", alone=True)
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
    assert not list(tmp_path.glob(".soup.*.partial"))
    made = load_file(output / "model.safetensors")["big"]
    assert made.shape == (elements,) and bool((made == 2.0).all())
