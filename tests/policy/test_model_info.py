import json

import torch

from mobile_vla.cli import main
from mobile_vla.policy import build_policy


def test_model_info_tiny_matches_the_built_model(capsys, tiny_config):
    assert main(["model", "info", "--preset", "tiny", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    torch.manual_seed(0)
    model = build_policy(tiny_config)
    assert info["parameters"]["total"] == sum(p.numel() for p in model.parameters())
    assert info["memory_bytes"]["weights_fp32"] == 4 * info["parameters"]["total"]
    assert info["inputs"]["kosmos_input_ids"] == f"int64 [B, {tiny_config.token_length}]"
    assert info["outputs"]["actions"].startswith(f"float32 [B, T, {tiny_config.chunk}, 3]")


def test_model_info_full_has_real_kosmos2_and_clip_sizes_without_download(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["model", "info", "--preset", "full", "--json"]) == 0
    params = json.loads(capsys.readouterr().out)["parameters"]
    kosmos = params["kosmos.vision"] + params["kosmos.text"] + params["kosmos.image_to_text"]
    assert kosmos == 1_664_485_376  # Kosmos2Model at kosmos-2-patch14-224 sizes
    assert params["clip.vision"] + params["clip.text"] == 151_277_313  # CLIP ViT-B/32
    assert params["kosmos.text.lora"] > 0 and params["trainable"] < 0.01 * params["total"]


def test_model_info_prints_tables(capsys):
    assert main(["model", "info", "--preset", "small"]) == 0
    out = capsys.readouterr().out
    assert "kosmos.vision" in out and "weights_fp32" in out and "in  images" in out


def test_unknown_preset_exits_2(capsys):
    assert main(["model", "info", "--preset", "huge"]) == 2
    assert "policy preset 'huge'" in capsys.readouterr().err
