"""The two modules that become ONNX graphs, and the torch.onnx.export call that writes them.

    step_args, text_args = example_inputs(model, preprocessing)
    torch_export(StepGraph(model).eval(), step_args, path, step_in, step_out, "dynamo", opset=18, large=False)

StepGraph is `policy.step_with_safety` with clip_text and the LSTM state as explicit tensors (its forward's
arguments are named like the graph inputs, STEP_INPUTS); TextGraph is the CLIP text encoder, run once
per instruction. The batch axis is dynamic in both exporters.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from mobile_vla.errors import ModelError
from mobile_vla.export.signature import BATCH, STEP_INPUTS, TensorSpec

log = logging.getLogger(__name__)

EXPORTERS = ("dynamo", "legacy")
MAX_EXPORT_BATCH = 4096  # the dynamo exporter wants a bound on the dynamic batch


class StepGraph(nn.Module):
    """policy.step_with_safety with clip_text and the LSTM state as explicit tensors (names = STEP_INPUTS,
    outputs = STEP_OUTPUTS: the step's, then the safety ladder's confidence_now and vision_features).
    """

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        self.policy = policy

    def forward(
        self,
        images,
        state,
        clip_text,
        kosmos_input_ids,
        kosmos_attention_mask,
        kosmos_image_embeds_position_mask,
        h_in,
        c_in,
    ):
        # Cast the uint8 frames first: identical values (uint8 -> float is exact), and the uint8
        # input then feeds only a Cast, the one use TensorRT allows for a UINT8 network input.
        images = images.to(clip_text.dtype)
        tokens = {
            "kosmos_input_ids": kosmos_input_ids,
            "kosmos_attention_mask": kosmos_attention_mask,
            "kosmos_image_embeds_position_mask": kosmos_image_embeds_position_mask,
        }
        out = self.policy.step_with_safety(images, state, tokens, (h_in, c_in), clip_text=clip_text)
        h_out, c_out = out.memory
        return out.actions, out.confidence, h_out, c_out, out.confidence_now, out.vision_features  # = STEP_OUTPUTS


class TextGraph(nn.Module):
    """The CLIP text encoder: clip_input_ids int64 [B,77] -> clip_text float32 [B,D]."""

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, clip_input_ids):
        return self.policy.encode_instruction(clip_input_ids)


def io_specs(model, preprocessing) -> tuple[list[TensorSpec], list[TensorSpec], list[TensorSpec], list[TensorSpec]]:
    """The graphs' I/O from the model's config: (step inputs, step outputs, text inputs, text outputs)."""
    config = model.config
    size = preprocessing.image_size
    L = config.token_length
    layers, hidden = config.lstm_layers, config.lstm_hidden
    D = model.clip.feature_dim
    step_in = [
        TensorSpec(name="images", dtype="uint8", shape=[BATCH, size, size, 3]),
        TensorSpec(name="state", dtype="float32", shape=[BATCH, config.state_dim]),
        TensorSpec(name="clip_text", dtype="float32", shape=[BATCH, D]),
        *(TensorSpec(name=n, dtype="int64", shape=[BATCH, L]) for n in STEP_INPUTS[3:6]),
        TensorSpec(name="h_in", dtype="float32", shape=[layers, BATCH, hidden]),
        TensorSpec(name="c_in", dtype="float32", shape=[layers, BATCH, hidden]),
    ]
    step_out = [
        TensorSpec(name="actions", dtype="float32", shape=[BATCH, config.chunk, 3]),
        TensorSpec(name="confidence", dtype="float32", shape=[BATCH]),
        TensorSpec(name="h_out", dtype="float32", shape=[layers, BATCH, hidden]),
        TensorSpec(name="c_out", dtype="float32", shape=[layers, BATCH, hidden]),
        TensorSpec(name="confidence_now", dtype="float32", shape=[BATCH]),
        TensorSpec(name="vision_features", dtype="float32", shape=[BATCH, model.vision_feature_dim]),
    ]
    text_in = [TensorSpec(name="clip_input_ids", dtype="int64", shape=[BATCH, 77])]
    text_out = [TensorSpec(name="clip_text", dtype="float32", shape=[BATCH, D])]
    return step_in, step_out, text_in, text_out


def example_inputs(model, preprocessing, batch: int = 2) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor]]:
    """Arguments to trace StepGraph and TextGraph with: zero frames and state, real tokens, zero memory."""
    size = preprocessing.image_size
    texts = ["go to the red box"] * batch
    tokens = preprocessing.tokenize(texts)
    h, c = model.initial_memory(batch)
    step_args = (
        torch.zeros(batch, size, size, 3, dtype=torch.uint8),
        torch.zeros(batch, model.config.state_dim),
        model.encode_instruction(torch.from_numpy(tokens["clip_input_ids"])).detach(),
        *(torch.from_numpy(tokens[k]) for k in STEP_INPUTS[3:6]),
        h,
        c,
    )
    return step_args, (torch.from_numpy(tokens["clip_input_ids"]),)


def export_graphs(
    model: nn.Module, preprocessing, step_path: Path, text_path: Path, exporter: str, opset: int, large: bool
) -> tuple[str, list[str]]:
    """Writes the step and text graphs; a failing dynamo export of the step graph falls back to legacy.

    Returns:
        The exporter that wrote the graphs, and notes for the user (why it fell back).

    Raises:
        ModelError: the (legacy) exporter failed.
    """
    step_in, step_out, text_in, text_out = io_specs(model, preprocessing)
    with torch.no_grad():
        step_args, text_args = example_inputs(model, preprocessing)
    used, notes = exporter, []
    try:
        torch_export(StepGraph(model).eval(), step_args, step_path, step_in, step_out, exporter, opset, large)
    except Exception as exc:
        if exporter != "dynamo":
            raise ModelError(f"torch.onnx.export ({exporter}) failed: {str(exc).splitlines()[0]}") from exc
        notes.append(f"dynamo exporter failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); used legacy")
        log.warning("%s", notes[-1])
        used = "legacy"
        for leftover in step_path.parent.glob(step_path.name + "*"):  # the graph and any weights side file
            leftover.unlink()
        torch_export(StepGraph(model).eval(), step_args, step_path, step_in, step_out, used, opset, large)
    torch_export(TextGraph(model).eval(), text_args, text_path, text_in, text_out, used, opset, False)
    return used, notes


def _batch_axes(specs: list[TensorSpec]) -> dict[str, int]:
    return {s.name: s.shape.index(BATCH) for s in specs}


def torch_export(
    module: nn.Module,
    args: tuple,
    path: Path,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    exporter: str,
    opset: int,
    large: bool,
) -> None:
    """Writes `module` to `path` as ONNX with a dynamic batch axis.

    nn.MultiheadAttention's fused inference fast path is off meanwhile: it is taken whenever no
    gradient is needed (eval + frozen CLIP, or no_grad) and `_native_multi_head_attention` has no
    ONNX export; the unfused path computes the same attention.

    Args:
        module: StepGraph or TextGraph, in eval mode.
        args: example arguments (example_inputs).
        path: the .onnx file to write.
        inputs: the graph's inputs as signature TensorSpecs (names and the batch axis).
        outputs: the graph's outputs likewise.
        exporter: "dynamo" or "legacy" (the TorchScript exporter).
        opset: the ONNX opset.
        large: keep the weights in a side file (over protobuf's 2 GB limit).
    """
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        _export_call(module, args, path, inputs, outputs, exporter, opset, large)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _export_call(module, args, path: Path, inputs, outputs, exporter: str, opset: int, large: bool) -> None:
    in_names = [s.name for s in inputs]
    out_names = [s.name for s in outputs]
    if exporter == "dynamo":
        batch = torch.export.Dim("B", min=1, max=MAX_EXPORT_BATCH)
        # The wrappers' forward arguments are named like the graph inputs.
        dynamic_shapes = {name: {axis: batch} for name, axis in _batch_axes(inputs).items()}
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            input_names=in_names,
            output_names=out_names,
            dynamic_shapes=dynamic_shapes,
            opset_version=opset,
            external_data=large,
            verbose=False,
        )
        program.save(str(path), external_data=large)
    else:
        axes = {**_batch_axes(inputs), **_batch_axes(outputs)}
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=False,
            input_names=in_names,
            output_names=out_names,
            dynamic_axes={name: {axis: BATCH} for name, axis in axes.items()},
            opset_version=opset,
            do_constant_folding=True,
        )
