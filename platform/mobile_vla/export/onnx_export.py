"""ONNX export of ONE recurrent step (state in, state out, dynamic batch) + the CLIP text encoder.

    result = export_model(model_dir, fp16=True)      # writes model_dir/onnx/, or raises and writes nothing

Graphs (I/O in signature.json; B is dynamic, everything else fixed):
    model.onnx         images uint8 [B,224,224,3], state f32 [B,S] (normalised), clip_text f32 [B,D],
                       kosmos_input_ids / kosmos_attention_mask / kosmos_image_embeds_position_mask
                       int64 [B,L], h_in / c_in f32 [layers,B,hidden]
                       -> actions f32 [B,K,3] (normalised), confidence f32 [B], h_out / c_out,
                       confidence_now f32 [B] (k=0), vision_features f32 [B,F] (novelty; signature v2)
    model.fp16.onnx    the same graph computing in fp16, fp32 I/O (so callers never change)
    text_encoder.onnx  clip_input_ids int64 [B,77] -> clip_text f32 [B,D], once per instruction,
                       so ONNX-only serving needs no torch

Steps: torch.onnx.export (torch_graphs.py; dynamo by default, the legacy TorchScript exporter if asked or if dynamo
fails), the ONNX checker, an offline ONNX Runtime pass at the BASIC level (constant folding and
redundant-node removal only: the result stays standard ONNX that TensorRT and every execution
provider parse; sessions apply the hardware-specific levels when they load), the fp16 conversion
(onnxruntime.transformers.float16, keep_io_types), the parity checks (parity.py) on the files as
written, then signature.json with a sha256 per file. Everything is built in a scratch folder and
moved into place only after parity passed, so a refused export leaves the previous onnx/ untouched.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnx_ir
import onnxruntime as ort
import torch
from onnxruntime.transformers.float16 import convert_float_to_float16

from mobile_vla.errors import ModelError
from mobile_vla.export import parity
from mobile_vla.export.quantize import STEP_INT8_FILE, quantize_step_graph
from mobile_vla.export.signature import (
    BATCH,
    ONNX_DIR,
    ActionSpec,
    ExporterInfo,
    ExportSignature,
    GraphFile,
    ModelRef,
    PreprocessingSpec,
    RecurrentSpec,
    TokenizerSpec,
    file_sha256,
    load_signature,
    verify_graph_file,
)
from mobile_vla.export.torch_graphs import EXPORTERS, export_graphs, io_specs
from mobile_vla.policy import load_policy
from mobile_vla.policy.config import MEASURED_VELOCITY
from mobile_vla.policy.preprocessing import Preprocessing

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18
STEP_FILE = "model.onnx"
STEP_FP16_FILE = "model.fp16.onnx"
TEXT_FILE = "text_encoder.onnx"
PROTOBUF_LIMIT = 1_800_000_000  # bytes of weights above which graphs keep their weights in a side file


@dataclass
class ExportResult:
    """The exported folder, its signature, seconds per export step and notes for the user."""

    onnx_dir: Path
    signature: ExportSignature
    seconds: dict[str, float] = field(default_factory=dict)
    exporter_notes: list[str] = field(default_factory=list)


# --- the contract, described from the model --------------------------------------------------------


def describe_policy(model, preprocessing, name: str | None = None, version: str | None = None) -> ExportSignature:
    """The signature of a model that has no graphs (yet): what the torch backend serves under."""
    config = model.config
    if preprocessing.chunk != config.chunk or preprocessing.state_dim != config.state_dim:
        raise ModelError(
            f"preprocessing (chunk {preprocessing.chunk}, state_dim {preprocessing.state_dim}) does not match "
            f"the policy config (chunk {config.chunk}, state_dim {config.state_dim})"
        )
    # the state a robot sends must be the one the model was trained on; a model that ignores its state
    # ("none", or saved before preprocessing recorded state_input) takes the previous command harmlessly
    if (preprocessing.state_input == MEASURED_VELOCITY) != (config.state_input == MEASURED_VELOCITY):
        raise ModelError(
            f"preprocessing state_input {preprocessing.state_input!r} does not match the policy config's "
            f"{config.state_input!r}: robots would be told to send the wrong state"
        )
    step_in, step_out, _, _ = io_specs(model, preprocessing)
    return ExportSignature(
        model=ModelRef(name=name, version=version),
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        inputs=step_in,
        outputs=step_out,
        graphs={},
        preprocessing=PreprocessingSpec(
            image_size=preprocessing.image_size,
            resize_rule=preprocessing.resize_rule,
            image_mean=preprocessing.image_mean,
            image_std=preprocessing.image_std,
            state_dim=preprocessing.state_dim,
            state_mean=preprocessing.state_mean,
            state_std=preprocessing.state_std,
            state_input=preprocessing.state_input,
            window=preprocessing.window,
            chunk=preprocessing.chunk,
            control_hz=preprocessing.control_hz,
        ),
        tokenizer=TokenizerSpec(
            path="policy/preprocessing/tokenizer",
            clip_length=77,
            kosmos_length=config.token_length,
            text_encoder=TEXT_FILE,
        ),
        actions=ActionSpec(low=preprocessing.action_low, high=preprocessing.action_high, chunk=config.chunk),
        chunk=config.chunk,
        recurrent=RecurrentSpec(
            layers=config.lstm_layers, hidden=config.lstm_hidden, shape=[config.lstm_layers, BATCH, config.lstm_hidden]
        ),
        opset=None,
        exporter=None,
    )


# --- export steps --------------------------------------------------------------------------------


def _check_graph(path: Path) -> None:
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # onnx raises ValidationError / InferenceError
        raise ModelError(f"{path}: the ONNX checker refused the exported graph: {str(exc).splitlines()[0]}") from None


def _offline_optimise(source: Path, target: Path, large: bool) -> None:
    """BASIC-level ONNX Runtime graph optimisation, written back as standard ONNX."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(target)
    options.log_severity_level = 3
    if large:
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", target.name + ".data"
        )
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    domains = {n.domain for n in onnx.load(str(target), load_external_data=False).graph.node} - {"", "ai.onnx"}
    if domains:
        raise ModelError(f"{target}: offline optimisation left non-standard ops (domains {sorted(domains)})")


def _to_fp16(source: Path, target: Path, large: bool) -> str:
    model = onnx.load(str(source))
    converted = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=large)
    # The converter appends the Casts of kept-fp32 inputs at the end of the node list; ONNX wants
    # nodes in topological order, so sort them (onnx_ir comes with onnxscript).
    graph = onnx_ir.serde.deserialize_model(converted)
    graph.graph.sort()
    converted = onnx_ir.serde.serialize_model(graph)
    onnx.save_model(
        converted, str(target), save_as_external_data=large, location=target.name + ".data" if large else None
    )
    return f"onnxruntime.transformers.float16 {ort.__version__} (keep_io_types=True)"


def _graph_file(folder: Path, name: str, precision: str, inputs, outputs) -> GraphFile:
    path = folder / name
    data = {p.name: file_sha256(p) for p in sorted(folder.glob(name + ".data*"))}
    return GraphFile(
        file=name,
        precision=precision,
        sha256=file_sha256(path),
        bytes=path.stat().st_size,
        inputs=inputs,
        outputs=outputs,
        external_data=data,
    )


def _check_optimise_convert(scratch: Path, fp16: bool, large: bool, say: Callable[[str], None]) -> str | None:
    """scratch/raw/*.onnx -> checked, optimised scratch/*.onnx (+ the fp16 step graph); returns the fp16 converter."""
    for name in (STEP_FILE, TEXT_FILE):
        _check_graph(scratch / "raw" / name)
        _offline_optimise(scratch / "raw" / name, scratch / name, large and name == STEP_FILE)
        _check_graph(scratch / name)
    converter = None
    if fp16:
        say("converting to fp16")
        converter = _to_fp16(scratch / STEP_FILE, scratch / STEP_FP16_FILE, large)
        _check_graph(scratch / STEP_FP16_FILE)
    shutil.rmtree(scratch / "raw")
    return converter


def _install(scratch: Path, target: Path) -> Path:
    """Moves the finished scratch folder into place; the previous onnx/ goes only once the new one is there."""
    if target.exists():
        retired = target.parent / ".onnx.old"
        shutil.rmtree(retired, ignore_errors=True)
        target.rename(retired)
        scratch.rename(target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        scratch.rename(target)
    return target


def export_model(
    model_dir: str | Path,
    *,
    name: str | None = None,
    version: str | None = None,
    fp16: bool = False,
    int8: bool = False,
    exporter: str = "dynamo",
    opset: int = DEFAULT_OPSET,
    data_dir: str | Path | None = None,
    progress=None,
) -> ExportResult:
    """Exports `model_dir/policy` to `model_dir/onnx/` after the parity checks pass (else ModelError).

    `int8` adds model.int8.onnx (export/quantize.py: calibrated on `data_dir`'s frames, checked
    against the fp32 graph).
    """
    if exporter not in EXPORTERS:
        raise ModelError(f"exporter = {exporter!r}: expected one of {EXPORTERS}")
    say = progress or (lambda text: log.info("%s", text))
    model_dir = Path(model_dir)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    say("loading the policy")
    model, preprocessing = load_policy(model_dir)
    if preprocessing is None:
        raise ModelError(f"{model_dir}: the saved policy has no preprocessing/ (needed for signature.json)")
    model = model.float().eval()
    base = describe_policy(model, preprocessing, name=name, version=version)
    step_in, step_out, text_in, text_out = io_specs(model, preprocessing)
    large = sum(p.numel() * 4 for p in model.parameters()) > PROTOBUF_LIMIT

    scratch = model_dir / ".onnx.partial"
    shutil.rmtree(scratch, ignore_errors=True)
    (scratch / "raw").mkdir(parents=True)
    try:
        say(f"exporting the graphs ({exporter} exporter, opset {opset})")
        raw_step, raw_text = scratch / "raw" / STEP_FILE, scratch / "raw" / TEXT_FILE
        used, notes = export_graphs(model, preprocessing, raw_step, raw_text, exporter, opset, large)
        seconds["torch_export"] = time.perf_counter() - clock

        say("checking and optimising the graphs")
        converter = _check_optimise_convert(scratch, fp16, large, say)
        seconds["check_optimise_convert"] = time.perf_counter() - clock - sum(seconds.values())

        say("measuring parity against PyTorch on real frames")
        frames = parity.parity_frames(
            max(max(parity.PARITY_BATCHES), 2 * preprocessing.window), preprocessing.image_size, data_dir
        )
        figures = parity.measure_parity(
            model,
            preprocessing,
            fp32_session=parity.cpu_session(scratch / STEP_FILE),
            text_session=parity.cpu_session(scratch / TEXT_FILE),
            fp16_session=parity.cpu_session(scratch / STEP_FP16_FILE) if fp16 else None,
            frames=frames,
        )
        seconds["parity"] = time.perf_counter() - clock - sum(seconds.values())

        graphs = {
            "step_fp32": _graph_file(scratch, STEP_FILE, "fp32", step_in, step_out),
            "text_encoder": _graph_file(scratch, TEXT_FILE, "fp32", text_in, text_out),
        }
        if fp16:
            graphs["step_fp16"] = _graph_file(scratch, STEP_FP16_FILE, "fp16", step_in, step_out)
        quantizer = None
        if int8:
            figures, quantizer = _add_int8(
                scratch,
                base.model_copy(update={"graphs": graphs, "parity": figures}),
                preprocessing,
                frames,
                data_dir,
                say,
            )
            graphs["step_int8"] = _graph_file(scratch, STEP_INT8_FILE, "int8", step_in, step_out)
            seconds["int8"] = time.perf_counter() - clock - sum(seconds.values())
        signature = base.model_copy(
            update={
                "graphs": graphs,
                "opset": opset,
                "exporter": ExporterInfo(
                    name="torch.onnx.export",
                    dynamo=used == "dynamo",
                    opset=opset,
                    torch=torch.__version__,
                    onnx=onnx.__version__,
                    onnxruntime=ort.__version__,
                    offline_optimisation="ORT_ENABLE_BASIC",
                    fp16_converter=converter,
                    int8_quantizer=quantizer,
                ),
                "parity": figures,
            }
        )
        signature.save(scratch)
        target = _install(scratch, model_dir / ONNX_DIR)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    seconds["total"] = time.perf_counter() - clock
    return ExportResult(onnx_dir=target, signature=signature, seconds=seconds, exporter_notes=notes)


def _add_int8(folder: Path, signature: ExportSignature, preprocessing, frames, data_dir, say) -> tuple:
    """model.int8.onnx beside the fp32 graph in `folder`, checked -> (parity figures with int8, quantizer)."""
    int8, quantizer = quantize_step_graph(folder, signature, preprocessing, frames, data_dir, say=say)
    _check_graph(folder / STEP_INT8_FILE)
    figures = signature.parity.model_copy(update={"int8": int8})
    return figures, quantizer


def add_int8(model_dir: str | Path, data_dir: str | Path | None = None, progress=None) -> ExportSignature:
    """Adds model.int8.onnx to a version's verified export (no torch export: it is made from model.onnx).

    The graph and the new signature.json go in only after the int8 parity check passed; signature.json
    is replaced in one rename, so a reader sees the old export or the new one, never half of each.

    Raises:
        ModelError: no verified export, or the int8 graph is refused (the export is then unchanged).
    """
    say = progress or (lambda text: log.info("%s", text))
    folder = Path(model_dir) / ONNX_DIR
    signature = load_signature(folder)
    for graph in signature.graphs.values():
        verify_graph_file(folder, graph)
    if signature.parity is None:
        raise ModelError(f"{folder}: signature.json has no parity figures (re-export with --force)")
    preprocessing = Preprocessing.load(Path(model_dir) / signature.preprocessing.saved_at)
    frames = parity.parity_frames(
        max(max(parity.PARITY_BATCHES), 2 * preprocessing.window), preprocessing.image_size, data_dir
    )
    figures, quantizer = _add_int8(folder, signature, preprocessing, frames, data_dir, say)
    graphs = {
        **signature.graphs,
        "step_int8": _graph_file(folder, STEP_INT8_FILE, "int8", signature.inputs, signature.outputs),
    }
    updated = signature.model_copy(
        update={
            "graphs": graphs,
            "parity": figures,
            "exporter": signature.exporter.model_copy(update={"int8_quantizer": quantizer}),
        }
    )
    updated.save(folder)
    return updated
