#!/usr/bin/env bash
# The engines on a GPU, in one call: transformers (plain and olmo2kit's compiled path) against vLLM, on the 1B
# and 7B architectures with random weights in bf16 (speed does not depend on the weights; nothing is downloaded).
#
#   bash benchmarks/gpu_engines.sh OUT_DIR            # on the GPU machine, from the repository root
#   SIZES=7b bash benchmarks/gpu_engines.sh OUT_DIR   # one size per call, where a call has 10 minutes
#   SMOKE=1 bash benchmarks/gpu_engines.sh /tmp/r     # a dry run on the CPU: the tiny architecture (head
#                                                     size 64, which vLLM's CPU attention runs), fp32
#
# What it measures, each into OUT_DIR as soon as it is measured (a run cut short keeps what it has):
#   bench-SIZE-{plain,compiled,vllm}.json   batch-1 decode tokens/s (`olmo2kit bench`)
#   engines-SIZE.json                       64-prompt batch-job throughput and time to first token, both engines,
#                                           each beside its library's direct call (benchmarks/bench_engines.py)
#                                           and perplexity throughput on both engines (windows of 2048)
# vLLM must be importable there (its wheel is far over what can be carried): the first line says whether it is;
# without it, only the transformers rows are measured.
set -u
out=${1:?usage: gpu_engines.sh OUT_DIR}
mkdir -p "$out"
export PYTHONPATH=src
py=${PYTHON:-.venv/bin/python}
kit=(${py} -m olmo2kit)
if [ -n "${SMOKE:-}" ]; then
  sizes=(tiny64); dtype=fp32; device=cpu; new=8; prompts=8; text_tokens=256; window=64
  export VLLM_CPU_KVCACHE_SPACE=1
else
  sizes=(${SIZES:-1b 7b}); dtype=bf16; device=cuda; new=128; prompts=64; text_tokens=16384; window=2048
fi
if ${py} -c "import vllm" 2>/dev/null; then engines=(transformers vllm); echo "vllm: importable"; \
else engines=(transformers); echo "vllm: NOT importable here; transformers rows only"; fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | tee "$out/device.txt"

for size in "${sizes[@]}"; do
  common=(--random-init --size "$size" --dtype "$dtype" --device "$device" --new-tokens "$new" --prompt-len 32
          --repeat 3 --json)
  timeout 300 "${kit[@]}" bench "${common[@]}" --engine transformers > "$out/bench-$size-plain.json"
  timeout 300 "${kit[@]}" bench "${common[@]}" --engine transformers --compile > "$out/bench-$size-compiled.json"
  if [ "${#engines[@]}" = 2 ]; then
    timeout 300 "${kit[@]}" bench "${common[@]}" --engine vllm > "$out/bench-$size-vllm.json"
    timeout 600 ${py} benchmarks/bench_engines.py --size "$size" --dtype "$dtype" --device "$device" \
      --prompts "$prompts" --new-tokens "$new" --perplexity-tokens "$text_tokens" --window "$window" \
      --json "$out/engines-$size.json"
  fi
done
echo "done: $(ls "$out")"
