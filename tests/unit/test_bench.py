"""``gpufleet bench``: the command it runs on a host and the table it prints (the lab runs it
against the real vLLM: tests/e2e/test_real_engine.py; lab/tests/test_vllm_contract.py parses
these arguments with the pinned release's own ``vllm bench serve`` parser)."""

from __future__ import annotations

import shlex

from gpufleet.fleet import bench

RECORD = {"id": "7398ba663135", "image": "vllm/vllm-openai:v0.32.0",
          "model": "meta-llama/Meta-Llama-3-8B-Instruct",
          "revision": "20a10702226f10727dacdee59bd5c0a1441b3359", "served_name": "llama3-8b",
          "endpoint": "http://127.0.0.1:8000", "env_file": "/etc/gpufleet/llama3.env",
          "container": "gpufleet-llama3", "quantization": "fp8"}


def test_the_blogs_method_is_the_default():
    args = bench.bench_args(RECORD, bench.Workload(), "r.json")
    pairs = dict(zip(args[::2], args[1::2], strict=False))
    assert pairs["--num-prompts"] == "100" and pairs["--max-concurrency"] == "20"
    assert pairs["--dataset-name"] == "random" and pairs["--base-url"] == RECORD["endpoint"]
    assert pairs["--model"] == "llama3-8b"
    assert pairs["--tokenizer"] == ("/root/.cache/huggingface/hub/models--meta-llama--Meta-Llama-"
                                    "3-8B-Instruct/snapshots/" + RECORD["revision"])
    assert "--insecure" not in args
    https = bench.bench_args({**RECORD, "endpoint": "https://127.0.0.1:8000"}, bench.Workload(),
                             "r.json")
    assert "--insecure" in https


def test_the_host_command_runs_the_release_image_and_carries_no_key():
    command = bench.host_command("llama3", RECORD, bench.Workload(), "r.json")
    words = shlex.split(command)
    run = words[words.index("run") - 1:]
    assert run[:5] == ["docker", "run", "--rm", "--network", "host"]
    assert "vllm/vllm-openai:v0.32.0" in run
    assert "/etc/gpufleet/llama3.env:/run/gpufleet/service.env:ro" in run
    assert '"$models":/root/.cache/huggingface:ro' in command  # the running container's store
    assert "$VLLM_API_KEY" in command and "Authorization" not in command
    assert command.endswith("cat /var/lib/gpufleet/llama3/releases/7398ba663135/bench/r.json")
    assert "echo '##GPUFLEET_BENCH_JSON##'" in command


def test_the_result_is_read_after_its_marker():
    lines = ["noise", "============ Serving Benchmark Result ============", bench.JSON_MARK,
             '{"completed": 100, "failed": 0,', '"request_throughput": 4.2}']
    assert bench.parse_output(lines) == {"completed": 100, "failed": 0,
                                         "request_throughput": 4.2}
    assert bench.parse_output(["no marker"]) is None
    assert bench.parse_output([bench.JSON_MARK, "not json"]) is None


def test_the_compare_table_shows_both_runs_and_the_ratio():
    fp16 = {"request_throughput": 2.0, "output_throughput": 200.0, "p50_ttft_ms": 100.0,
            "p99_ttft_ms": 300.0, "p50_tpot_ms": 20.0, "p99_tpot_ms": 40.0, "failed": 0}
    fp8 = {**fp16, "request_throughput": 3.0, "output_throughput": 310.0, "p50_ttft_ms": 80.0}
    text = bench.table([("fp16", fp16), ("fp8", fp8)])
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["run", "req/s", "out"]
    assert lines[1].split()[:3] == ["fp16", "2.00", "200.0"]
    assert lines[3].split()[:4] == ["ratio", "1.50x", "1.55x", "0.80x"]
    assert bench.summary({**fp8, "extra": 1, "release": "r"})["release"] == "r"
