"""The GGUF cache is never wrong: local checkpoints keyed by content, cached files checked before use, partial
files of killed writers removed, and a full disk said in one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import OLMO2KIT, one_line_error
from olmo2kit.files import file_sha256, file_stamp
from olmo2kit.model import gguf as gguf_module
from olmo2kit.model.gguf import (
    cache_path,
    cached_gguf,
    checked_record,
    checkpoint_dir,
    converter_inputs,
    export_gguf,
    file_digests,
    record_path,
)
from olmo2kit.model.tiny import build_tiny


def _normalise_mtimes(path: Path) -> None:
    """Every file's mtime set to one value, as tar, Docker layers and Nix leave them."""
    for p in path.iterdir():
        os.utime(p, ns=(1_000_000_000, 1_000_000_000))


def _old_key(path: Path) -> list:
    """What the cache was keyed by before it read content: the path and each file's name, size and mtime."""
    return [str(path.resolve()), [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.iterdir())]]


def _embeddings(gguf_path: Path):
    import gguf

    tensor = next(t for t in gguf.GGUFReader(str(gguf_path)).tensors if t.name == "token_embd.weight")
    return tensor.data


def _settled(files: list[Path]) -> None:
    """Wait until each file is older than the time within which the cache does not remember a digest."""
    newest = max(p.stat().st_ctime_ns for p in files)
    while time.time_ns() - newest <= gguf_module.SETTLED_NS:
        time.sleep(0.01)


def _cache_with(gguf: Path, path: Path, cache: Path) -> Path:
    """`cache` holding `gguf` and its record as the f32 GGUF of the checkpoint at `path`; the file's place."""
    place = cache_path(*checkpoint_dir(str(path)), "f32", cache)
    place.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(gguf, place)
    shutil.copyfile(record_path(gguf), record_path(place))
    return place


def test_another_checkpoint_copied_with_the_old_mtimes_is_converted_again(llamacpp_tiny, tmp_path, monkeypatch):
    """A checkpoint put where another was, each file of the same size and with the same mtime (a tar or Docker
    copy), is not served the other's cached GGUF: it is converted, and `export gguf` writes its weights."""
    from safetensors.numpy import load_file

    path = build_tiny(tmp_path / "a" / "tiny", seed=0)  # the weights of the session's tiny checkpoint
    _normalise_mtimes(path)
    before = _old_key(path)
    cache = tmp_path / "cache"
    monkeypatch.setenv("OLMO2KIT_GGUF_CACHE", str(cache))
    first = _cache_with(llamacpp_tiny[0].gguf, path, cache)
    said = []
    assert cached_gguf(*checkpoint_dir(str(path)), "f32", say=said.append) == first and not said
    build_tiny(path, seed=1)
    _normalise_mtimes(path)
    assert _old_key(path) == before  # nothing but the bytes differs
    assert cache_path(*checkpoint_dir(str(path)), "f32") != first
    out = export_gguf(str(path), tmp_path / "exported.gguf", gguf_type="f32", say=said.append)
    assert said == [f"converting {path} to GGUF (f32)"]
    weights = load_file(path / "model.safetensors")["model.embed_tokens.weight"]
    assert (_embeddings(out) == weights).all() and not (_embeddings(first) == weights).all()


def test_digests_are_remembered_until_a_file_changes(tmp_path):
    """Each file's digest is read once and remembered by its stamp; a file whose stamp changed is read again, even
    with its old size and mtime put back (the ctime cannot be)."""
    path = build_tiny(tmp_path / "ckpt", seed=0)
    (path / "optimizer.pt").write_bytes(b"not read")
    (path / ".olmo2kit.lock").write_bytes(b"pid 1")
    files = converter_inputs(path)
    assert {p.name for p in files} >= {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert not {"optimizer.pt", ".olmo2kit.lock"} & {p.name for p in files}
    _settled(files)
    memo = tmp_path / "digests.json"
    truth = {str(p): file_sha256(p) for p in files}
    assert file_digests(files, memo) == truth
    remembered = json.loads(memo.read_text())
    assert set(remembered) == set(truth)
    config = str(path / "config.json")
    remembered[config]["sha256"] = "0" * 64  # what is remembered is believed while the stamp holds
    memo.write_text(json.dumps(remembered))
    assert file_digests(files, memo)[config] == "0" * 64
    stat = os.stat(config)
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # size and mtime as they were; a new ctime
    assert file_digests(files, memo)[config] == truth[config]


def _cut_short(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _change_a_byte(path: Path) -> None:
    with path.open("r+b") as f:
        f.seek(path.stat().st_size * 2 // 3)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def _break_the_header(path: Path) -> None:
    with path.open("r+b") as f:
        f.write(b"GGUX")


def _drop_the_record(path: Path) -> None:
    record_path(path).unlink()


DAMAGE = {"cut short": _cut_short, "a byte changed": _change_a_byte, "header": _break_the_header,
          "no record": _drop_the_record}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_cached_gguf_fails_its_check_and_is_removed(llamacpp_tiny, tiny_path, tmp_path, damage):
    path = _cache_with(llamacpp_tiny[0].gguf, tiny_path, tmp_path / "cache")
    said = []
    assert checked_record(path, said.append) is not None and not said  # a copy, so read whole: whole
    DAMAGE[damage](path)
    assert checked_record(path, said.append) is None
    assert len(said) == 1 and f"the cached GGUF {path} failed its check" in said[0], said
    assert not path.exists() and not record_path(path).exists()


def test_a_damaged_cached_gguf_is_converted_again_before_generating(llamacpp_tiny, tiny_path, tiny, tmp_path, cli,
                                                                    monkeypatch):
    """A cached GGUF cut short is not used (llama.cpp gave empty text, exit 0): one line says so, the checkpoint
    is converted again, and the text is transformers'."""
    from olmo2kit.inference.generation import generate

    monkeypatch.setenv("OLMO2KIT_GGUF_CACHE", str(tmp_path / "cache"))
    path = _cache_with(llamacpp_tiny[0].gguf, tiny_path, tmp_path / "cache")
    size = path.stat().st_size
    _cut_short(path)
    code, out, err = cli("generate", "Language modeling is", "-m", str(tiny_path), "--engine", "llamacpp",
                         "--dtype", "fp32", "--greedy", "--max-new-tokens", "8", "--json")
    assert code == 0, err
    assert [line for line in err.splitlines() if "failed its check" in line] == [
        f"the cached GGUF {path} failed its check ({size // 2:,} bytes where {size:,} were written): "
        "converting it again"], err
    expected = generate(*tiny, "Language modeling is", do_sample=False, max_new_tokens=8)
    assert json.loads(out)["text"] == expected.text
    assert path.stat().st_size == size and file_sha256(path) == json.loads(record_path(path).read_text())["sha256"]


def test_export_copies_only_the_bytes_recorded(llamacpp_tiny, tiny_path, tmp_path, cli, monkeypatch):
    """A cached GGUF whose bytes changed while its stamp did not (a disk's own fault) passes the quick check
    before use, but `export` reads it whole as it copies: it is not written out; the checkpoint is converted."""
    monkeypatch.setenv("OLMO2KIT_GGUF_CACHE", str(tmp_path / "cache"))
    path = _cache_with(llamacpp_tiny[0].gguf, tiny_path, tmp_path / "cache")
    record = json.loads(record_path(path).read_text())
    _change_a_byte(path)
    record["stamp"] = list(file_stamp(path.stat()))  # the stamp of the changed file: as if it had not changed
    record_path(path).write_text(json.dumps(record))
    out = tmp_path / "tiny.gguf"
    code, _, err = cli("export", "gguf", str(tiny_path), str(out), "-q", "f32")
    assert code == 0, err
    assert f"the cached GGUF {path} failed its check (its bytes are not those written)" in err
    assert file_sha256(out) == record["sha256"] and not path.exists()


def _dead(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _partials(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(".*partial"))


def test_an_export_killed_mid_write_leaves_no_partial_file_after_the_next_export(tmp_path, cli, monkeypatch):
    """kill -9 of `export gguf -q q4_k_m` while it writes leaves its hidden partial files in the output folder;
    the next export there removes them (their writer is gone) and writes whole. A checkpoint wide enough (head
    size 256) that the conversion is caught while it writes."""
    import psutil

    wide = build_tiny(tmp_path / "wide", head_dim=256, seed=0)
    monkeypatch.setenv("OLMO2KIT_GGUF_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([str(OLMO2KIT), "export", "gguf", str(wide), str(out / "a.gguf"), "-q", "q4_k_m"],
                            env={**os.environ}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not _partials(out) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    children = psutil.Process(proc.pid).children(recursive=True)
    proc.kill()
    proc.wait(timeout=60)
    for child in children:  # the converter dies with its parent
        while not _dead(child.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
    left = _partials(out)
    assert left and all(name.startswith(f".a.gguf.{proc.pid}.partial") for name in left), left
    code, _, err = cli("export", "gguf", str(wide), str(out / "b.gguf"), "-q", "q4_k_m")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["b.gguf"]


@pytest.mark.parametrize(("gguf_type", "room"), [
    ("f32", "256k"),  # the tiny f32 GGUF is 560 KiB: the converter fills the disk
    ("q4_k_m", "384k"),  # its bf16 (290 KiB) fits, its q4_k_m (125 KiB) beside it not: llama.cpp's quantizer fills it
])
def test_a_full_disk_during_conversion_is_one_line(tiny_path, tmp_path, gguf_type, room):
    """A conversion onto a full disk (a small tmpfs, mounted in a user namespace of the export's own) says "No
    space left on device" in one line, exit 2, not the converter's progress bar, and leaves no file there."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = f"mount -t tmpfs -o size={room} tmpfs {disk}"
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", mount], capture_output=True).returncode:
        pytest.skip("a tmpfs cannot be mounted here (unshare, user namespaces)")
    export = f"{OLMO2KIT} export gguf {tiny_path} {disk}/x.gguf -q {gguf_type}"
    done = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                           f"{mount} && {export}; code=$?; ls -A {disk} >&2; exit $code"],
                          capture_output=True, text=True, timeout=300, env={**os.environ,
                                                                           "OLMO2KIT_GGUF_CACHE": str(tmp_path)})
    line = one_line_error(done.returncode, done.stderr, f"cannot write {disk}/x.gguf (No space left on device)")
    assert "%|" not in done.stderr and line.endswith("free some space, then run again")
    assert done.stderr.splitlines()[-1] == line  # `ls -A` of the disk after the export: nothing
