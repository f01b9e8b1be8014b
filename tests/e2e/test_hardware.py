"""GPU offload and KV cache settings on the real server: `--n-gpu-layers auto` on a CPU-only
build serves and says so, a KV cache combination llama.cpp cannot run is a clear start-up
error, and Ollama's num_ctx limits a request within the server's context."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import llama_cpp
import ollama
import pytest

from tests.support.server import MODEL, Server, start_server, stop_server

pytestmark = pytest.mark.e2e

HELLO = [{"role": "user", "content": "Write one sentence about the sea."}]


@pytest.mark.skipif(llama_cpp.llama_supports_gpu_offload(),
                    reason="this llama-cpp-python build has GPU support")
def test_auto_gpu_layers_on_a_cpu_only_build_serves_and_says_so(tmp_path: Path) -> None:
    server = start_server(tmp_path, "--n-gpu-layers", "auto")
    try:
        hardware = server.model_status()["hardware"]
        r = httpx.post(f"{server.base_url}/v1/chat/completions", timeout=120,
                       json={"model": MODEL, "messages": HELLO, "max_tokens": 8})
        log = server.log_path.read_text(errors="replace")
    finally:
        stop_server(server)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
    assert hardware["backend"] == "CPU" and hardware["devices"] == ["CPU"]
    assert hardware["gpu_layers"] == 0 and hardware["layers"] > 1
    assert hardware["cpu_reason"] == "this build has no GPU support"
    assert hardware["cache_type_k"] == hardware["cache_type_v"] == "f16"
    assert log.count("CPU only (this build has no GPU support)") == 1  # said once, at start


def test_the_health_report_names_the_kv_cache_types(tmp_path: Path) -> None:
    server = start_server(tmp_path, "--n-gpu-layers", "0", "--cache-type-k", "q8_0",
                          "--cache-type-v", "q4_0")
    try:
        hardware = server.model_status()["hardware"]
        log = server.log_path.read_text(errors="replace")
    finally:
        stop_server(server)
    assert (hardware["cache_type_k"], hardware["cache_type_v"]) == ("q8_0", "q4_0")
    assert hardware["gpu_layers"] == 0
    assert "KV cache q8_0/q4_0" in log


def test_a_quantized_v_cache_without_flash_attention_is_a_clear_startup_error(
        tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "pensieve.cli", "serve", "--data-dir",
                          str(tmp_path), "--cache-type-v", "q8_0", "--flash-attn", "off"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "Invalid configuration" in out.stderr and "needs flash attention" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.fixture(scope="module")
def oc(server: Server) -> ollama.Client:
    return ollama.Client(host=server.base_url, timeout=120)


def test_num_ctx_above_the_servers_context_is_a_clear_400(oc: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as exc:
        oc.chat(model=MODEL, messages=HELLO, options={"num_ctx": 1 << 20})
    assert exc.value.status_code == 400 and "num_ctx" in exc.value.error


def test_num_ctx_limits_the_prompt_and_the_answer(oc: ollama.Client) -> None:
    probe = oc.chat(model=MODEL, messages=HELLO, options={"temperature": 0, "num_predict": 1})
    num_prompt = probe.prompt_eval_count
    assert num_prompt
    limited = oc.chat(model=MODEL, messages=HELLO,
                      options={"temperature": 0, "num_predict": 64, "num_ctx": num_prompt + 4})
    assert limited.eval_count == 4 and limited.done_reason == "length"
    with pytest.raises(ollama.ResponseError) as exc:
        oc.chat(model=MODEL, messages=HELLO, options={"num_ctx": num_prompt - 1})
    assert exc.value.status_code == 400 and "num_ctx" in exc.value.error
