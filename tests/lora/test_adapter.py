"""Reading PEFT adapter folders: what is accepted, and the clear load-time error for everything the
batched LoRA path cannot apply exactly (never silently wrong output)."""
from __future__ import annotations

import math
import os
import shutil

import pytest
import torch
from lora_adapters import edited_adapter
from safetensors.torch import load_file

from radixserve.lora.adapter import LoRAError, load_adapter, model_layout, read_adapter_config
from radixserve.lora.refs import TARGET_MODULES, LoRARef, parse_lora_paths, parse_target_modules
from radixserve.model.llama import lora_projections
from radixserve.model.loader import load_model_config



@pytest.fixture(scope="module")
def cfg(tiny_llama):
    return load_model_config(tiny_llama)


def load(path, cfg, targets=TARGET_MODULES, max_rank=16):
    return load_adapter(path, cfg.num_layers, model_layout(lora_projections(cfg), targets), max_rank, torch.float32)


def edited(tmp_path, src: str, config: dict | None = None, weights=None, name: str = "edited") -> str:
    return edited_adapter(tmp_path, src, name, config, weights)


def test_layout_and_scaling(tiny_adapters, cfg):
    """Weights land rank-major per fused linear, missing pieces zero, scaling folded into B."""
    path = tiny_adapters["r8_kv_alpha"]
    ad = load(path, cfg)
    assert ad.rank == 8 and ad.targets == ("k_proj", "v_proj", "down_proj")
    assert ad.scaling == pytest.approx(5 / 8)
    raw = load_file(os.path.join(path, "adapter_model.safetensors"))
    pre = "base_model.model.model.layers.1.self_attn"
    a, b = ad.weights[(1, "qkv_proj")]
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    assert a.shape == (8 * 3, cfg.hidden_size) and b.shape == (8 * 3, q + 2 * kv)
    assert torch.equal(a[0::3], torch.zeros(8, cfg.hidden_size))  # q piece: not targeted
    assert torch.equal(a[1::3], raw[f"{pre}.k_proj.lora_A.weight"])
    assert torch.allclose(b[2::3, q + kv:], raw[f"{pre}.v_proj.lora_B.weight"].T * 5 / 8)
    assert torch.equal(b[1::3, q + kv:], torch.zeros(8, kv))  # k rows write only k's columns
    assert (1, "o_proj") not in ad.weights and (0, "down_proj") in ad.weights


def test_rslora_scaling(tiny_adapters, cfg):
    assert load(tiny_adapters["r16_mlp_rslora"], cfg).scaling == pytest.approx(8 / math.sqrt(16))


def test_bin_weights_accepted(tmp_path, tiny_adapters, cfg):
    src = tiny_adapters["r4_qv"]
    dst = str(tmp_path / "bin")
    shutil.copytree(src, dst)
    file = os.path.join(dst, "adapter_model.safetensors")
    torch.save(load_file(file), os.path.join(dst, "adapter_model.bin"))
    os.remove(file)
    a = load(dst, cfg).weights[(0, "qkv_proj")]
    b = load(src, cfg).weights[(0, "qkv_proj")]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_regex_and_all_linear_target_modules(tmp_path, tiny_adapters):
    from radixserve.lora.adapter import config_targets

    path = tiny_adapters["r4_qv"]
    assert config_targets(path, {"target_modules": ["q_proj", "model.layers.0.self_attn.v_proj"]}) == (
        "q_proj", "v_proj")
    assert config_targets(path, {"target_modules": r".*\.(q_proj|down_proj)"}) == ("q_proj", "down_proj")
    assert config_targets(path, {"target_modules": "all-linear"}) == TARGET_MODULES


@pytest.mark.parametrize("change, message", [
    ({"use_dora": True}, "DoRA"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"bias": "lora_only"}, "bias"),
    ({"rank_pattern": {"q_proj": 2}}, "rank_pattern"),
    ({"alpha_pattern": {"q_proj": 2}}, "alpha_pattern"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out"),
    ({"peft_type": "IA3"}, "peft_type"),
    ({"alora_invocation_tokens": [1, 2]}, "activated LoRA"),
    ({"r": 4096}, "rank 4096, above --max-lora-rank 16"),
])
def test_unsupported_config_refused(tmp_path, tiny_adapters, cfg, change, message):
    path = edited(tmp_path, tiny_adapters["r4_qv"], config=change)
    with pytest.raises(LoRAError, match=message):
        load(path, cfg)


def test_rank_above_max(tiny_adapters, cfg):
    with pytest.raises(LoRAError, match="rank 16, above --max-lora-rank 8"):
        load(tiny_adapters["r16_mlp_rslora"], cfg, max_rank=8)


@pytest.mark.parametrize("extra, message", [
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector.weight", "DoRA"),
    ("base_model.model.model.embed_tokens.lora_embedding_A", "embedding"),
    ("base_model.model.lm_head.lora_A.weight", "lm_head"),
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias", "bias"),
    ("base_model.model.model.layers.0.mlp.router.lora_A.weight", "router"),
])
def test_unsupported_weights_refused(tmp_path, tiny_adapters, cfg, extra, message):
    def add(w):
        w[extra] = torch.zeros(4, 4)
        return w

    with pytest.raises(LoRAError, match=message):
        load(edited(tmp_path, tiny_adapters["r4_qv"], weights=add), cfg)


def test_other_base_model_refused(tmp_path, tiny_adapters, cfg):
    """Shapes or layer count of another model: refused, naming the layer and the module."""
    def wider(w):
        key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        w[key] = torch.zeros(w[key].shape[0], 96)
        return w

    with pytest.raises(LoRAError, match=r"layer 0 q_proj maps 96 → 64 features.*maps 64 → 64.*another base"):
        load(edited(tmp_path, tiny_adapters["r4_qv"], weights=wider, name="wide"), cfg)

    def deeper(w):
        for k in list(w):
            w[k.replace("layers.1.", "layers.5.")] = w[k].clone()
        return w

    with pytest.raises(LoRAError, match="layer 5, but the base model has 2 layers"):
        load(edited(tmp_path, tiny_adapters["r4_qv"], weights=deeper, name="deep"), cfg)


def test_incomplete_weights_refused(tmp_path, tiny_adapters, cfg):
    def drop_b(w):
        del w["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
        return w

    with pytest.raises(LoRAError, match="layer 1 v_proj has lora_A without lora_B"):
        load(edited(tmp_path, tiny_adapters["r4_qv"], weights=drop_b), cfg)

    def nan(w):
        w["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"][0, 0] = float("nan")
        return w

    with pytest.raises(LoRAError, match="non-finite"):
        load(edited(tmp_path, tiny_adapters["r4_qv"], weights=nan, name="nan"), cfg)


def test_target_outside_flag_refused(tiny_adapters, cfg):
    with pytest.raises(LoRAError, match=r"targets down_proj, outside --lora-target-modules \(k_proj, v_proj;"):
        load(tiny_adapters["r8_kv_alpha"], cfg, targets=("k_proj", "v_proj"))


def test_missing_files(tmp_path, tiny_adapters, cfg):
    with pytest.raises(LoRAError, match="not a directory"):
        read_adapter_config(str(tmp_path / "nowhere"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LoRAError, match="no adapter_config.json"):
        read_adapter_config(str(empty))
    no_weights = edited(tmp_path, tiny_adapters["r4_qv"], name="noweights")
    os.remove(os.path.join(no_weights, "adapter_model.safetensors"))
    with pytest.raises(LoRAError, match="has no weights"):
        load(no_weights, cfg)
    corrupt = edited(tmp_path, tiny_adapters["r4_qv"], name="corrupt")
    with open(os.path.join(corrupt, "adapter_model.safetensors"), "wb") as f:
        f.write(b"not a safetensors file")
    with pytest.raises(LoRAError, match="cannot read adapter_model.safetensors"):
        load(corrupt, cfg)


def test_lora_paths_forms():
    refs = parse_lora_paths(["/a/b", "x=/c", '{"lora_name": "y", "lora_path": "/d", "pinned": true}',
                             {"lora_name": "z", "lora_path": "/e"}])
    assert refs == [LoRARef("/a/b", "/a/b"), LoRARef("x", "/c"), LoRARef("y", "/d", True), LoRARef("z", "/e")]
    assert parse_lora_paths({"n": "/p"}) == [LoRARef("n", "/p")]
    for bad, message in [(["x=/a", "x=/b"], "twice"), (['{"lora_name": "y"}'], "needs a lora_path"),
                         (['{"lora_path": "/p", "colour": 1}'], "unknown key"), (["{oops"], "not valid JSON"),
                         (["=/p"], "non-empty")]:
        with pytest.raises(ValueError, match=message):
            parse_lora_paths(bad)
    assert parse_target_modules(["all"]) == TARGET_MODULES
    assert parse_target_modules(["v_proj", "q_proj"]) == ("q_proj", "v_proj")
    with pytest.raises(ValueError, match="embed_tokens"):
        parse_target_modules(["embed_tokens"])


def test_server_args_lora_checks():
    from radixserve.config import ServerArgs

    assert ServerArgs(model_path="m", lora_paths=["a=/a"]).enable_lora  # implied
    with pytest.raises(ValueError, match="max_loaded_loras"):
        ServerArgs(model_path="m", max_loaded_loras=2, max_loras_per_batch=4)
    with pytest.raises(ValueError, match="pin fewer"):
        ServerArgs(model_path="m", max_loras_per_batch=1, lora_paths=['{"lora_path": "/a", "pinned": true}'])


def test_cli_lora_flags():
    import argparse

    from radixserve.cli import add_server_args, server_args_from

    parser = argparse.ArgumentParser()
    add_server_args(parser)
    ns = parser.parse_args(["--model-path", "m", "--enable-lora", "--lora-paths", "a=/x", "/y",
                            '{"lora_name": "c", "lora_path": "/z", "pinned": true}', "--max-loras-per-batch", "2",
                            "--lora-target-modules", "q_proj", "v_proj", "--max-lora-rank", "32"])
    args = server_args_from(ns)
    assert args.lora_paths[:2] == ["a=/x", "/y"] and args.max_loras_per_batch == 2
    assert args.lora_target_modules == ["q_proj", "v_proj"] and args.max_lora_rank == 32
    assert [r.name for r in parse_lora_paths(args.lora_paths)] == ["a", "/y", "c"]
