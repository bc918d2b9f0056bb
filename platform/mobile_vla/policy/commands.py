"""`mobile-vla model info --preset NAME`: parameters per part, shapes and weight memory, no download.

The model is built on torch's `meta` device (shapes only, no memory, no weights), so even `full`
(1.8 B parameters) is described in a couple of seconds on a laptop. A CLI face: torch, the model
and rich are imported inside the command functions, so `mobile-vla --help` never loads them.
"""

from __future__ import annotations

import json

from mobile_vla.policy.config import ACTION_DIM, CLIP_CONTEXT_LENGTH, IMAGE_SIZE
from mobile_vla.policy.presets import get_preset


def register(subparsers) -> None:
    """Adds `model info` to the CLI."""
    model = subparsers.add_parser("model", help="describe policy presets (parameters, shapes, memory)")
    model_sub = model.add_subparsers(dest="model_command", metavar="SUBCOMMAND")
    info = model_sub.add_parser("info", help="parameter counts per part, input/output shapes, weight memory")
    info.add_argument("--preset", required=True, help="tiny | small | full")
    info.add_argument("--json", action="store_true", help="print JSON instead of tables")
    info.set_defaults(func=run_info)
    model.set_defaults(func=lambda args: model.print_help() or 2)


def describe_preset(name: str) -> dict:
    """Parameter counts, memory and shapes of a preset, computed on the meta device."""
    import torch

    from mobile_vla.policy.model import MobileVLAPolicy

    config = get_preset(name)
    with torch.device("meta"):
        model = MobileVLAPolicy(config, load_pretrained=False)
    count = _count
    kosmos, clip = model.kosmos.model, model.clip.model
    lora = sum(p.numel() for n, p in kosmos.named_parameters() if "lora_" in n)
    parts = {
        "kosmos.vision": count(kosmos.vision_model),
        "kosmos.text": count(kosmos.text_model) - lora,
        "kosmos.text.lora": lora,
        "kosmos.image_to_text": count(kosmos.image_to_text_projection),
        "clip.vision": count(clip.visual),
        "clip.text": count(clip) - count(clip.visual),
        "fusion": count(model.fusion),
        "lstm": count(model.lstm),
        "head": count(model.head),
    }
    total = sum(parts.values())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    L, K, S = config.token_length, config.chunk, config.state_dim
    layers, hidden = config.lstm_layers, config.lstm_hidden
    shapes_in = {
        "images": f"uint8 [B, T, {IMAGE_SIZE}, {IMAGE_SIZE}, 3]",
        "state": f"float32 [B, T, {S}]",
        "clip_input_ids": f"int64 [B, {CLIP_CONTEXT_LENGTH}]",
        "kosmos_input_ids": f"int64 [B, {L}]",
        "kosmos_attention_mask": f"int64 [B, {L}]",
        "kosmos_image_embeds_position_mask": f"int64 [B, {L}]",
        "frame_mask": "float32 [B, T] (optional)",
    }
    shapes_out = {
        "actions": f"float32 [B, T, {K}, {ACTION_DIM}] in [-1, 1]",
        "log_var": f"float32 [B, T, {K}, {ACTION_DIM}]",
        "confidence": "float32 [B, T] in [0, 1]",
        "memory (h, c)": f"float32 [{layers}, B, {hidden}] each",
        "step: actions / confidence": f"[B, {K}, {ACTION_DIM}] / [B]",
    }
    return {
        "preset": name,
        "pretrained": {"kosmos": config.kosmos.pretrained, "clip": config.clip.pretrained},
        "window": config.window,
        "chunk": K,
        "token_length": L,
        "fusion": config.fusion,
        "parameters": {**parts, "total": total, "trainable": trainable},
        "memory_bytes": {
            "weights_fp32": 4 * total,
            "weights_bf16": 2 * total,
            # fp32 weights + fp32 grads and two Adam moments for the trainable part only
            "train_adam_fp32": 4 * total + 12 * trainable,
        },
        "inputs": shapes_in,
        "outputs": shapes_out,
    }


def run_info(args) -> int:
    """Prints `describe_preset` of one preset as tables, or as JSON with --json."""
    info = describe_preset(args.preset)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    params = Table(title=f"policy preset {info['preset']!r}: parameters (fusion {info['fusion']})")
    params.add_column("part")
    params.add_column("parameters", justify="right")
    params.add_column("share", justify="right")
    total = info["parameters"]["total"]
    for part, n in info["parameters"].items():
        params.add_row(part, f"{n:,}", f"{100 * n / total:.1f}%")
    console.print(params)
    memory = Table(title="memory the weights need")
    memory.add_column("what")
    memory.add_column("size", justify="right")
    for what, n in info["memory_bytes"].items():
        memory.add_row(what, _human(n))
    console.print(memory)
    shapes = Table(title=f"shapes (T = window {info['window']}, K = chunk {info['chunk']}, L = {info['token_length']})")
    shapes.add_column("tensor")
    shapes.add_column("dtype [shape]")
    for name, shape in info["inputs"].items():
        shapes.add_row(f"in  {name}", shape)
    for name, shape in info["outputs"].items():
        shapes.add_row(f"out {name}", shape)
    console.print(shapes)
    pretrained = info["pretrained"]
    if pretrained["kosmos"] or pretrained["clip"]:
        console.print(
            f"pretrained weights (not downloaded here): kosmos={pretrained['kosmos']!r} clip={pretrained['clip']!r}"
        )
    return 0


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n:.1f} GiB"
