"""Supervised start-up: model files are checked before the engine is spawned, an engine that fails or
dies before its handshake raises at once in the caller (with why), and a script fed on stdin works."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from radixserve.config import ServerArgs
from radixserve.managers.launch import EngineProcess, EngineStartError
from radixserve.model_files import ModelFileError, check_model_files

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_truncated_gguf_names_the_file(default_model, tmp_path):
    path = tmp_path / "cut.gguf"
    with open(default_model, "rb") as f:
        path.write_bytes(f.read(50_000_000))
    with pytest.raises(ModelFileError, match=r"cut\.gguf.*(truncated|not a readable GGUF)"):
        EngineProcess(ServerArgs(model_path=str(path)))


@pytest.mark.parametrize("files, problem", [
    ({}, "has no config.json"),
    ({"config.json": "{not json"}, "config.json is not valid JSON"),
    ({"config.json": "{}"}, r"has no \*\.safetensors"),
    ({"model.bin": ""}, "has no config.json"),
])
def test_bad_model_folder_names_the_problem(tmp_path, files, problem):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ModelFileError, match=problem):
        check_model_files(str(tmp_path))


def test_missing_or_odd_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_model_files(str(tmp_path / "nothing"))
    odd = tmp_path / "weights.bin"
    odd.write_bytes(b"\0" * 16)
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        check_model_files(str(odd))


def test_unsupported_architecture_is_refused_before_the_spawn(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelFileError, match=r"config\.json: unsupported model type 'gpt2' \(supported: bert, llama"):
        EngineProcess(ServerArgs(model_path=str(tmp_path)))


def test_engine_failure_is_raised_with_its_reason(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    engine = EngineProcess(ServerArgs(model_path=str(tmp_path)))
    with pytest.raises(EngineStartError, match="engine failed to start"):
        engine.wait_ready()
    assert not engine.alive()


def test_engine_death_before_handshake_raises_at_once(default_model):
    engine = EngineProcess(ServerArgs(model_path=default_model))
    os.kill(engine.proc.pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(EngineStartError, match=r"exited with code -9 before it was ready"):
        engine.wait_ready()
    assert time.monotonic() - start < 5


def test_engine_from_a_script_on_stdin(tiny_model_dir):
    script = (f"import radixserve\n"
              f"with radixserve.Engine(model_path={tiny_model_dir()!r}, max_total_tokens=512) as e:\n"
              f"    print(len(e.generate('Hello', {{'max_new_tokens': 3, 'ignore_eos': True}})['output_ids']))\n")
    out = subprocess.run([sys.executable, "-"], input=script, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "3"
