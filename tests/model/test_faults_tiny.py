"""`olmo2kit tiny DIR` replaces only a tiny checkpoint it wrote itself (issue #12): anything else is refused, whole."""

import json
from pathlib import Path

import pytest

from conftest import one_line_error
from olmo2kit.errors import Olmo2KitError
from olmo2kit.model.tiny import MARKER, build_tiny


def snapshot(path):
    """Every file under `path` with its bytes, and every directory."""
    return {p.relative_to(path).as_posix(): p.read_bytes() if p.is_file() else None for p in sorted(path.rglob("*"))}



def finetune_output(path):
    """What a fine-tuning run leaves: a saved model, checkpoints and a loss log."""
    (path / "checkpoints" / "step-10").mkdir(parents=True)
    (path / "checkpoints" / "step-10" / "state.json").write_text('{"step": 10}')
    (path / "config.json").write_text('{"model_type": "olmo2"}')
    (path / "model.safetensors").write_bytes(b"weights")
    (path / "train_log.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    return path


def test_a_finetune_output_is_refused_and_kept(cli, tmp_path):
    out = finetune_output(tmp_path / "ft")
    before = snapshot(out)
    code, _, err = cli("tiny", str(out))
    one_line_error(code, err, f"{out} exists and is not a checkpoint, so it is not replaced", alone=True)
    assert MARKER in err and snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ft"]  # no staging left beside it


def test_a_folder_with_an_empty_config_is_refused_and_kept(cli, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "notes.txt").write_text("my notes")
    before = snapshot(folder)
    code, _, err = cli("tiny", str(folder))
    one_line_error(code, err, "exists and is not a checkpoint, so it is not replaced", alone=True)
    assert snapshot(folder) == before


def test_a_tiny_checkpoint_is_replaced_and_an_empty_directory_written(cli, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, err = cli("tiny", str(empty))
    assert code == 0 and out.strip() == str(empty), err
    marker = json.loads((empty / MARKER).read_text())
    assert marker["seed"] == 0 and marker["instruct"] is False
    assert set(marker["files"]) | {MARKER} == {p.name for p in empty.iterdir()}
    weights = (empty / "model.safetensors").read_bytes()
    code, _, err = cli("tiny", str(empty), "--seed", "3", "--instruct")
    assert code == 0, err
    marker = json.loads((empty / MARKER).read_text())
    assert (marker["seed"], marker["instruct"]) == (3, True) and (empty / "model.safetensors").read_bytes() != weights
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # the old one moved aside is gone


def test_a_tiny_checkpoint_with_files_of_someone_else_is_refused(tmp_path):
    path = build_tiny(tmp_path / "t")
    (path / "notes.txt").write_text("mine")
    (path / "runs").mkdir()
    with pytest.raises(Olmo2KitError, match=r"t holds files that are not part of a tiny checkpoint \(notes.txt, run"):
        build_tiny(path, seed=1)
    assert (path / "notes.txt").read_text() == "mine" and (path / "runs").is_dir()


@pytest.mark.parametrize("marker", [
    None,  # a tiny checkpoint from before the marker, or anyone's checkpoint: nothing proves who wrote it
    "{}",
    "not json",
    json.dumps({"built_by": "olmo2kit tiny", "files": ["../x"]}),
    json.dumps({"built_by": "someone else", "files": []}),
])
def test_a_directory_without_a_marker_it_recognises_is_refused(tmp_path, marker):
    path = build_tiny(tmp_path / "t")
    if marker is None:
        (path / MARKER).unlink()
    else:
        (path / MARKER).write_text(marker)
    before = snapshot(path)
    with pytest.raises(Olmo2KitError, match="exists and is not a checkpoint, so it is not replaced"):
        build_tiny(path, seed=1)
    assert snapshot(path) == before


def test_a_file_or_a_link_is_refused(tmp_path):
    (tmp_path / "file").write_text("mine")
    with pytest.raises(Olmo2KitError, match="file exists and is not a checkpoint"):
        build_tiny(tmp_path / "file")
    real = build_tiny(tmp_path / "real")
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(Olmo2KitError, match="link exists and is not a checkpoint"):
        build_tiny(tmp_path / "link")
    assert (tmp_path / "file").read_text() == "mine" and (tmp_path / "link").is_symlink()


def test_a_full_disk_is_one_error_and_leaves_the_old_checkpoint_whole(tmp_path, monkeypatch):
    # No small file system can be filled here, so the rename of the new checkpoint into place (after the old one
    # was moved aside) answers as it does on a full disk, where the directory must grow for the new entry.
    import errno
    import os

    path = build_tiny(tmp_path / "t")
    before = snapshot(path)
    real_replace = os.replace

    def no_space(src, dst):
        if Path(dst) == path and not str(src).endswith(".old"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(Olmo2KitError, match=rf"^cannot write {path} \(No space left on device\): free some space"):
        build_tiny(path, seed=1)
    monkeypatch.undo()
    assert snapshot(path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["t"]


def small_disk_command(directory, *command) -> list[str] | None:
    """`command` run with a 200 kB tmpfs mounted on `directory`, in a user and mount namespace of its own (no
    privilege needed, nothing outside changes); None where this machine refuses such namespaces."""
    import shlex
    import shutil
    import subprocess

    if shutil.which("unshare") is None:
        return None
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True)
    if probe.returncode != 0:
        return None
    script = f"mount -t tmpfs -o size=200k tmpfs {shlex.quote(str(directory))} && exec {shlex.join(command)}"
    return ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script]


def test_a_real_full_disk_is_one_line(tmp_path):
    """A full disk met inside safetensors' own write (not an OSError) is one line too, and leaves nothing behind."""
    import subprocess

    from conftest import OLMO2KIT

    disk = tmp_path / "disk"
    disk.mkdir()
    command = small_disk_command(disk, str(OLMO2KIT), "tiny", str(disk / "t"))
    if command is None:
        pytest.skip("this machine refuses user namespaces, so no small disk can be mounted")
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot write {disk / 't'}"), done.stderr
