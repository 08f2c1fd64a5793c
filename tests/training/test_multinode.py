"""finetune --fsdp across two "machines" on loopback: two launchers started apart, as on two nodes, meet through a
rendezvous (torchrun's c10d; accelerate launch's main process address), train, save, and a second pair resumes.
One process per launcher, gloo on CPUs; the output directory is shared, as a cluster's filesystem is."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import OLMO2KIT
from olmo2kit.training.data import prepare_data

pytestmark = pytest.mark.usefixtures("one_thread")  # module by module, from conftest.py

BIN = Path(sys.executable).parent
# As tests/training/test_fsdp.py: 4 steps on a global batch of 4 rows, a checkpoint at step 2.
TRAINING = ["finetune", "--fsdp", "--device", "cpu", "--max-steps", "4", "--lr", "1e-3", "--batch-size", "1",
            "--grad-accum", "2", "--save-every", "2"]
# The same processes and batches, in the same order: a resumed run repeats the uninterrupted one's fp32 sums, and
# measured equal to the last bit; 1e-5 is the tolerance the other resume tests use.
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory, tiny_instruct_path) -> Path:
    root = tmp_path_factory.mktemp("multinode-data")
    pairs = [("Say hello.", "Hello, world!"), ("Count to five.", "1 2 3 4 5")] * 4
    (root / "chats.jsonl").write_text("".join(
        json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
        for q, a in pairs))
    prepare_data(root / "chats.jsonl", root / "data", model=str(tiny_instruct_path), seq_len=64)
    return root / "data"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_two_machines(launchers: list[list[str]]) -> list[subprocess.CompletedProcess]:
    """Start each launcher on its own, as on its own machine, and wait for both."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    running = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
               for command in launchers]
    finished = []
    for process in running:
        try:
            stdout, stderr = process.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for other in running:
                other.kill()
            raise
        finished.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    for completed in finished:
        assert completed.returncode == 0, completed.stderr[-3000:]
    return finished


def losses(output: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (output / "train_log.jsonl").read_text().splitlines()]


def test_two_nodes_train_save_and_resume(chat_data, tiny_instruct_path, tmp_path):
    finetune = [str(OLMO2KIT), *TRAINING, "--model", str(tiny_instruct_path), "--data", str(chat_data)]
    output = tmp_path / "out"
    # torchrun on each machine, the same line: the c10d rendezvous at the first machine's address ranks them.
    port = free_port()
    torchrun = [str(BIN / "torchrun"), "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"olmo2kit-{port}"]
    said = on_two_machines([[*torchrun, *finetune, "--output", str(output)]] * 2)
    stderr = "".join(c.stderr for c in said)
    assert "2 process(es)" in stderr and "FSDP2 over 2 processes" in stderr
    assert sorted(p.name for p in (output / "checkpoints" / "step-2").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "rng-0.pt", "rng-1.pt", "state.json"]
    uninterrupted = losses(output)
    assert len(uninterrupted) == 4 and uninterrupted[-1] < uninterrupted[0]

    # Killed after its checkpoint of step 2; resumed by accelerate launch on each machine, ranked by --machine_rank.
    cut = tmp_path / "cut"
    shutil.copytree(output, cut)
    for name in ("finetune.json", "model.safetensors"):
        (cut / name).unlink()
    port = free_port()
    accelerate = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend",
                  "no", "--num_machines", "2", "--num_processes", "2", "--main_process_ip", "127.0.0.1",
                  "--main_process_port", str(port)]
    # `-m olmo2kit` as configs/accelerate/*.yaml run it; --multi_gpu is accelerate's torch.distributed launcher, the
    # one an FSDP config also uses (on CPUs it starts gloo processes: finetune --device cpu picks the backend).
    module = ["-m", "olmo2kit", *finetune[1:], "--output", str(cut), "--resume"]
    said = on_two_machines([[*accelerate, "--machine_rank", str(rank), *module] for rank in (0, 1)])
    assert "resuming from" in "".join(c.stderr for c in said)
    assert losses(cut) == pytest.approx(uninterrupted, rel=TOLERANCE)
    finished = load_file(output / "model.safetensors")
    for name, weight in load_file(cut / "model.safetensors").items():
        assert weight.allclose(finished[name], rtol=TOLERANCE, atol=TOLERANCE), name
