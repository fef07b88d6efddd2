#!/usr/bin/env bash
# Prove gpufleet's GPU fact and verification against a real GPU with pyinfra's @local connector.
# Run on a GPU machine from the repository root; wheels for pyinfra and its needs in .whl/ when
# the machine cannot reach PyPI. Prints each step; exits non-zero if an expectation fails.
set -uo pipefail
if [ -d .whl ] && [ -z "${GPUFLEET_NO_WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
run() { echo "\$ $*"; "$@"; }
PY=$(command -v python3)
pyinfra() { "$PY" -c 'import sys; from pyinfra_cli.main import main; sys.argv[0]="pyinfra"; sys.exit(main())' "$@"; }
fail=0
echo "== nvidia-smi, as the fact asks it"
run nvidia-smi --query-gpu=index,uuid,name,memory.total,driver_version,compute_cap --format=csv,noheader,nounits
echo "== the fact, through pyinfra @local"
pyinfra @local fact gpufleet.facts.nvidia.NvidiaGpus 2>&1 | tail -n 30
echo "== verification that should pass (1 GPU, fp8 needs 8.9, 16000 MiB)"
pyinfra -y @local gpufleet.operations.nvidia.gpus_verified count=1 memory_mib=16000 \
  'compute_capability=[8, 9]' 2>&1 | tail -n 12 || fail=1
echo "== verification that must fail alone: more GPUs than the machine has"
if pyinfra -y @local gpufleet.operations.nvidia.gpus_verified count=16 host_name=device 2>&1 | tail -n 12; then
  echo "UNEXPECTED: passed"; fail=1; fi
echo "== verification that must fail: more memory than a GPU has"
if pyinfra -y @local gpufleet.operations.nvidia.gpus_verified memory_mib=200000 host_name=device 2>&1 | tail -n 12; then
  echo "UNEXPECTED: passed"; fail=1; fi
echo "== the image's CUDA build against this machine's driver (gpufleet.model.image_cuda)"
gpufleet() { "$PY" -c 'import sys; from gpufleet.cli.main import main; sys.argv[0]="gpufleet"; sys.exit(main())' "$@"; }
gpufleet plan deploys/llama3.yaml --local --offline 2>&1 | grep -E "^(== |image|GPUs|vLLM|verdict|KV cache /)" || fail=1
driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -n 1)
for image in vllm/vllm-openai:v0.32.0 vllm/vllm-openai:v0.32.0-cu129 vllm/vllm-openai:v0.11.0; do
  "$PY" -c 'import sys; from gpufleet.model.image_cuda import driver_verdict as v
r = v(sys.argv[1], sys.argv[2]); print(sys.argv[1], "on driver", sys.argv[2], "->", r.problem or "runs")' \
    "$image" "$driver"
done
echo "== without nvidia-smi on PATH (a VM without the driver)"
mkdir -p /tmp/nodriver-bin && for b in sh env cat echo printf; do ln -sf "$(command -v $b)" /tmp/nodriver-bin/; done
if PATH=/tmp/nodriver-bin pyinfra -y @local gpufleet.operations.nvidia.gpus_verified host_name=device 2>&1 | tail -n 12; then
  echo "UNEXPECTED: passed"; fail=1; fi
exit $fail
