"""`signature.json`: the contract of an exported model version, read by every backend before it runs.

Serving code in any language must be able to feed the graphs from this file alone: input and output
names, dtypes and shapes (symbolic batch "B"), the preprocessing constants, where the tokenizer lives,
how to de-normalise actions, the chunk length K and the recurrent state shape. It also records how the
graphs were made (exporter, opset) and the parity figures measured at export time, plus a sha256 per
graph file so a corrupt or swapped file is refused before it is loaded.

Versioned: `signature_version` changes when a field changes meaning; readers refuse versions they do
not know instead of guessing. Version 2 added two step-graph outputs for the serving safety ladder:
`confidence_now` [B] (the executed step's, k=0, confidence) and `vision_features` [B, F] (the frame's
pooled vision feature, scored for novelty against the version's training statistics). Version 1
artifacts still load and serve; they lack both outputs, so serving runs with novelty off and the
ladder reads `confidence` (the chunk's) instead (`has_safety_outputs`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator

from mobile_vla.config import StrictModel, format_validation_error
from mobile_vla.errors import ModelError
from mobile_vla.policy.config import PREVIOUS_COMMAND, STATE_INPUTS

SIGNATURE_VERSION = 2
READABLE_VERSIONS = (1, 2)
SIGNATURE_FILE = "signature.json"
ONNX_DIR = "onnx"  # the model version's folder holding signature.json and the graphs
BATCH = "B"
DType = Literal["uint8", "int64", "float32", "float16"]
ACTION_AXES = ["linear_x", "linear_y", "angular_z"]
# The step graph's I/O names, in order (serving, TensorRT and the parity checks all use these).
STEP_INPUTS = [
    "images",
    "state",
    "clip_text",
    "kosmos_input_ids",
    "kosmos_attention_mask",
    "kosmos_image_embeds_position_mask",
    "h_in",
    "c_in",
]
STEP_OUTPUTS_V1 = ["actions", "confidence", "h_out", "c_out"]
SAFETY_OUTPUTS = ["confidence_now", "vision_features"]  # since signature_version 2
STEP_OUTPUTS = STEP_OUTPUTS_V1 + SAFETY_OUTPUTS
TEXT_INPUTS = ["clip_input_ids"]
TEXT_OUTPUTS = ["clip_text"]


class TensorSpec(StrictModel):
    """One graph input or output: name, dtype and shape (ints fixed, "B" the dynamic batch axis)."""

    name: str
    dtype: DType
    shape: list[int | str]  # ints are fixed, "B" is the dynamic batch axis


class GraphFile(StrictModel):
    """One ONNX file, its precision, its I/O and a checksum of its bytes."""

    file: str  # relative to the folder holding signature.json
    precision: Literal["fp32", "fp16", "int8"]
    sha256: str
    bytes: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    external_data: dict[str, str] = Field(default_factory=dict)  # file -> sha256 (graphs over 2 GB)


class ModelRef(StrictModel):
    """The registered model version the graphs were exported from (None for a plain folder)."""

    name: str | None = None
    version: str | None = None


class PreprocessingSpec(StrictModel):
    """What Preprocessing does outside the graph (resize, state scaling); image mean/std run inside it."""

    image_size: int
    resize_rule: str
    image_mean: list[float]
    image_std: list[float]
    state_dim: int
    state_mean: list[float]
    state_std: list[float]
    # what a robot sends as `state` (STATE_INPUTS): "previous_command" = the command it executed at the
    # previous step, "measured_velocity" = the velocity its base realised then (0 translation after a
    # refused move), "none" = ignored (send zeros); zeros at an episode's start. Absent from older
    # signatures, which read as "previous_command".
    state_input: str = PREVIOUS_COMMAND
    window: int
    chunk: int
    control_hz: float
    saved_at: str = "policy/preprocessing"  # relative to the model version folder

    @field_validator("state_input")
    @classmethod
    def _known_state_input(cls, value: str) -> str:
        if value not in STATE_INPUTS:
            raise ValueError(f"{value!r}: expected one of {', '.join(map(repr, STATE_INPUTS))}")
        return value


class TokenizerSpec(StrictModel):
    """The instruction tokenizer; its files are saved with the preprocessing of the same version."""

    path: str  # relative to the model version folder
    clip_length: int  # clip_input_ids [B, 77]
    kosmos_length: int  # the three kosmos_* arrays [B, L]
    text_encoder: str  # graph file: clip_input_ids -> clip_text, run once per instruction


class ActionSpec(StrictModel):
    """Graph actions are in [-1, 1] per axis; de-normalise: low + (a + 1) / 2 * (high - low)."""

    axes: list[str] = Field(default_factory=lambda: list(ACTION_AXES))
    units: list[str] = Field(default_factory=lambda: ["m/s", "m/s", "rad/s"])
    low: list[float]  # q01 of the training split, per axis
    high: list[float]  # q99 of the training split, per axis
    chunk: int  # K


class RecurrentSpec(StrictModel):
    """LSTM state passed in and out of every step, so serving replicas keep no per-robot state."""

    layers: int
    hidden: int
    inputs: list[str] = Field(default_factory=lambda: ["h_in", "c_in"])
    outputs: list[str] = Field(default_factory=lambda: ["h_out", "c_out"])
    shape: list[int | str]  # [layers, B, hidden]; zeros at episode start


class ExporterInfo(StrictModel):
    """How the graphs were made: exporter, opset, library versions, optimisation and fp16 conversion."""

    name: str  # "torch.onnx.export"
    dynamo: bool
    opset: int
    torch: str
    onnx: str
    onnxruntime: str
    offline_optimisation: str  # the ORT level applied to model.onnx before it was written
    fp16_converter: str | None = None
    int8_quantizer: str | None = None  # how model.int8.onnx was made (export/quantize.py)


class Int8Parity(StrictModel):
    """The int8 step graph against the fp32 step graph (both ONNX Runtime CPU), measured at export time.

    Keys of `max_abs_diff`: "batch_1", "batch_32" (one step from a non-zero memory) and
    "sequence_<T>" (T steps from zero memory, each graph feeding its own state back); values: the max
    abs difference of "actions" (normalised, in [-1, 1]), "confidence", "h" and "c". The export is
    refused when actions or confidence exceed their tolerance anywhere (h and c are recorded only:
    their effect on the answers is what the sequence figures measure).
    """

    method: str  # e.g. "static-qdq"
    frames: str  # where the parity frames came from
    calibration: str  # where the calibration frames came from
    calibration_steps: int  # feeds the quantizer's calibration ran
    actions_tolerance: float
    confidence_tolerance: float
    max_abs_diff: dict[str, dict[str, float]]


class ParityFigures(StrictModel):
    """Max abs differences against PyTorch measured at export time; export refuses above tolerance."""

    frames: str  # where the test frames came from
    instructions: list[str]
    fp32_tolerance: float
    fp32_max_abs_diff: dict[str, float]  # "batch_1", "batch_32" -> over actions, confidence, h, c
    sequence_steps: int
    sequence_max_abs_diff: float  # T graph steps vs the PyTorch sequence forward
    text_encoder_max_abs_diff: float
    fp16_tolerance: float | None = None
    fp16_max_abs_diff: dict[str, float] | None = None
    int8: Int8Parity | None = None  # against the fp32 graph (absent: no int8 graph)


class ExportSignature(StrictModel):
    """signature.json: the step graph's I/O, the graph files, preprocessing, actions, recurrent state, parity."""

    signature_version: Literal[1, 2] = SIGNATURE_VERSION
    model: ModelRef
    created_at: str
    inputs: list[TensorSpec]  # of the step graph (fp32 and fp16 variants share them)
    outputs: list[TensorSpec]
    graphs: dict[str, GraphFile]  # "step_fp32", "step_fp16" / "step_int8" (optional), "text_encoder"
    preprocessing: PreprocessingSpec
    tokenizer: TokenizerSpec
    actions: ActionSpec
    chunk: int
    recurrent: RecurrentSpec
    opset: int | None  # None only for the in-memory signature of an unexported model (torch backend)
    exporter: ExporterInfo | None
    parity: ParityFigures | None = None  # None only for the in-memory signature of the torch backend

    @property
    def output_names(self) -> list[str]:
        """The step graph's outputs, in signature order (STEP_OUTPUTS; STEP_OUTPUTS_V1 for a version 1 export)."""
        return [spec.name for spec in self.outputs]

    @property
    def has_safety_outputs(self) -> bool:
        """Whether the step graph gives confidence_now and vision_features (signature_version >= 2)."""
        return all(name in self.output_names for name in SAFETY_OUTPUTS)

    def graph(self, key: str) -> GraphFile:
        if key not in self.graphs:
            raise ModelError(f"{SIGNATURE_FILE}: no graph {key!r} (has {sorted(self.graphs)})")
        return self.graphs[key]

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / SIGNATURE_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.model_dump(mode="json"), indent=2) + "\n")
        tmp.replace(path)
        return path


def load_signature(folder: str | Path) -> ExportSignature:
    """Reads and validates signature.json; every failure names the file and the field."""
    path = Path(folder) / SIGNATURE_FILE
    if not path.is_file():
        raise ModelError(f"{path}: missing (export the model first: mobile-vla export --model ...)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object")
    version = data.get("signature_version")
    if version not in READABLE_VERSIONS:
        known = list(READABLE_VERSIONS)
        raise ModelError(f"{path}: signature_version = {version!r}: this reader knows versions {known}")
    try:
        return ExportSignature.model_validate(data)
    except ValidationError as exc:
        raise ModelError(format_validation_error(exc, str(path))) from None


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """The hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def verify_graph_file(folder: str | Path, graph: GraphFile) -> Path:
    """The file exists and its bytes are the ones exported (external data files are checked by ORT)."""
    path = Path(folder) / graph.file
    if not path.is_file():
        raise ModelError(f"{path}: graph file named in {SIGNATURE_FILE} is missing")
    size = path.stat().st_size
    if size != graph.bytes:
        raise ModelError(f"{path}: {size} bytes, {SIGNATURE_FILE} says {graph.bytes} (truncated or replaced?)")
    digest = file_sha256(path)
    if digest != graph.sha256:
        raise ModelError(f"{path}: sha256 {digest[:12]}... does not match {SIGNATURE_FILE} ({graph.sha256[:12]}...)")
    for name, expected in graph.external_data.items():
        data = Path(folder) / name
        if not data.is_file() or file_sha256(data) != expected:
            raise ModelError(f"{data}: external weights of {graph.file} missing or not the exported bytes")
    return path


def check_io_matches(where: str, expected: list[TensorSpec], actual: list[TensorSpec], kind: str) -> None:
    """Names, dtypes and shapes of a loaded graph (or engine) equal what the signature promises."""
    want = {spec.name: spec for spec in expected}
    got = {spec.name: spec for spec in actual}
    if set(want) != set(got):
        raise ModelError(f"{where}: {kind} {sorted(got)} do not match {SIGNATURE_FILE} {sorted(want)}")
    for name, spec in want.items():
        other = got[name]
        if other.dtype != spec.dtype:
            raise ModelError(f"{where}: {kind[:-1]} {name!r} dtype {other.dtype}, {SIGNATURE_FILE} says {spec.dtype}")
        if len(other.shape) != len(spec.shape) or any(
            isinstance(a, int) != isinstance(b, int) or (isinstance(a, int) and a != b)
            for a, b in zip(other.shape, spec.shape, strict=True)
        ):
            raise ModelError(f"{where}: {kind[:-1]} {name!r} shape {other.shape}, {SIGNATURE_FILE} says {spec.shape}")
