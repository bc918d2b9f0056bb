"""int8: the step graph quantized for CPUs and edge computers, checked against the fp32 graph.

    graph, figures, how = quantize_step_graph(onnx_dir, signature, preprocessing, frames, calibration)

`model.int8.onnx` is `model.onnx` made in three steps, all on ONNX (no torch):
1. fold the pixel normalisation into the patch embeddings: the graph turns uint8 frames into
   `x * pixel_scale + pixel_shift` (per colour channel, on the whole [B,224,224,3] image) and feeds
   that to two stride = kernel, unpadded patch convolutions; `conv(W, a x + b) = conv(W a, x) + W b`
   exactly there, so the convolutions take the raw pixels and the two full-image elementwise ops go
   (on `small` at batch 32 they were about a quarter of the fp32 step's time on this 2-core CPU);
   other readers of the normalised frames (the safety outputs' image statistics) get them computed
   channel-first from the raw transposed pixels, a broadcast ONNX Runtime runs far faster;
2. static QDQ quantization (onnxruntime.quantization.quantize_static) of MatMul, Gemm and Conv:
   weights int8 per output channel, activations uint8 per tensor with ranges calibrated on real
   frames (the training data's, `--data DIR`, else MiniWorld renders) run through the fp32 graph as
   recurrent sequences from zero memory, so the LSTM state the calibration sees is a real one.
   `reduce_range` (7-bit weights) because CPUs without VNNI (this AVX2 box, many edge CPUs) can
   saturate the u8 x s8 products at 8 bits; ONNX Runtime fuses the QDQ pairs into QLinearMatMul /
   QLinearConv / QGemm when it loads the graph. The policy's own layers (fusion and head, FP32_LAYERS:
   well under 1% of the step's time) stay fp32, as do the LSTM, layer norms and softmax: quantizing
   the head put the rounding straight onto the actions (0.05 on `tiny`, 0.002 without).
   Dynamic quantization (weights only, activations quantized per call) was measured slower than fp32
   on `small` here: its per-call DynamicQuantizeLinear costs more than the small int8 matmuls save;
3. parity against the fp32 graph on frames the calibration did not use (`measure_int8_parity`): one
   step at batch 1 and 32 from a non-zero memory, and a `window`-step recurrent round trip from zero
   memory where each graph feeds back its own state. Refused (ModelError, nothing written) when an
   action (normalised, in [-1, 1]) differs by more than INT8_ACTIONS_TOLERANCE or the confidence by
   more than INT8_CONFIDENCE_TOLERANCE.

Tolerances: 0.05 on normalised actions is 2.5% of each axis' range (0.02 m/s on a 0.8 m/s range),
below the step-to-step change of a moving robot's command; 0.05 on the confidence in [0, 1]. Figures
measured on `tiny`/`small` are in each version's signature.json; whether int8 drives as well as fp32
is a closed-loop question (docs/performance.md), not one this check answers.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from mobile_vla.errors import ModelError
from mobile_vla.export import graph_parity, parity
from mobile_vla.export.signature import ExportSignature, Int8Parity

log = logging.getLogger(__name__)

STEP_INT8_FILE = "model.int8.onnx"
INT8_METHOD = "static-qdq"
INT8_ACTIONS_TOLERANCE = 5e-2
INT8_CONFIDENCE_TOLERANCE = 5e-2
QUANTIZED_OPS = ["MatMul", "Gemm", "Conv"]
FP32_LAYERS = ("policy.fusion.", "policy.head.")  # weights of the policy's own layers: kept fp32 (see above)
CALIBRATION_SEQUENCES = 8  # sequences of `window` steps each
CALIBRATION_SEED = 1  # MiniWorld frames other than the parity check's (seed 0)


# --- 1. fold the pixel normalisation into the patch convolutions -----------------------------------


def fold_pixel_affine(model: onnx.ModelProto) -> int:
    """Rewrites `Conv(Transpose(x * a + b))` with per-channel constants a, b [C] and an unpadded
    convolution into `Conv'(Transpose(x))` with W' = W a and bias' = bias + sum(W b); drops the nodes
    nothing reads any more. Returns how many convolutions were rewritten (0: the graph has no such chain).
    """
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    folded = 0
    raw_transposes: dict[tuple[str, tuple[int, ...]], str] = {}
    chains: dict[str, tuple] = {}  # normalised (transposed) tensor -> (raw transposed, scale, shift, rank)
    for conv in [n for n in graph.node if n.op_type == "Conv"]:
        chain = _affine_chain(conv, producer, inits)
        if chain is None:
            continue
        transpose, add, mul = chain
        scale = numpy_helper.to_array(inits[mul.input[1]]).astype(np.float64)  # [C]
        shift = numpy_helper.to_array(inits[add.input[1]]).astype(np.float64)  # [C]
        weight = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float64)  # [O, C, kh, kw]
        bias = (
            numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64)
            if len(conv.input) > 2 and conv.input[2]
            else np.zeros(weight.shape[0])
        )
        new_weight = (weight * scale[None, :, None, None]).astype(np.float32)
        new_bias = (bias + (weight * shift[None, :, None, None]).sum(axis=(1, 2, 3))).astype(np.float32)
        w_name, b_name = f"{conv.name}.folded_weight", f"{conv.name}.folded_bias"
        graph.initializer.extend(
            [numpy_helper.from_array(new_weight, w_name), numpy_helper.from_array(new_bias, b_name)]
        )
        perm = tuple(next(a.ints for a in transpose.attribute if a.name == "perm"))
        key = (mul.input[0], perm)
        if key not in raw_transposes:  # one transpose of the raw pixels for every conv that reads them
            raw_transposes[key] = f"{mul.input[0]}.nchw"
            graph.node.insert(
                list(graph.node).index(mul),  # before the old chain, so before every reader of it
                onnx.helper.make_node(
                    "Transpose",
                    [mul.input[0]],
                    [raw_transposes[key]],
                    perm=list(perm),
                    name=f"{mul.name}.raw_transpose",
                ),
            )
        del conv.input[:]
        conv.input.extend([raw_transposes[key], w_name, b_name])
        chains[transpose.output[0]] = (raw_transposes[key], scale, shift, len(perm))
        folded += 1
    for normalised, (raw, scale, shift, rank) in chains.items():
        _normalise_after_transpose(graph, normalised, raw, scale, shift, rank)
    if folded:
        _drop_dead_nodes(graph)
    return folded


def _normalise_after_transpose(graph, normalised: str, raw: str, scale, shift, rank: int) -> None:
    """Other readers of the normalised frames (e.g. image statistics) get them computed on the raw
    transposed pixels, channel-first: `raw * a[C,1,1] + b[C,1,1]`, a broadcast ONNX Runtime runs far
    faster than the channel-last one over a trailing axis of 3 (and the old chain goes dead).
    """
    readers = [node for node in graph.node if normalised in node.input]
    if not readers:
        return
    shape = [len(scale)] + [1] * (rank - 2)
    a_name, b_name, mid, out = (f"{normalised}.{suffix}" for suffix in ("nchw_scale", "nchw_shift", "scaled", "nchw"))
    graph.initializer.extend(
        [
            numpy_helper.from_array(scale.reshape(shape).astype(np.float32), a_name),
            numpy_helper.from_array(shift.reshape(shape).astype(np.float32), b_name),
        ]
    )
    position = next(i for i, node in enumerate(graph.node) if normalised in node.output)  # the old transpose
    graph.node.insert(position, onnx.helper.make_node("Add", [mid, b_name], [out], name=f"{normalised}.nchw_add"))
    graph.node.insert(position, onnx.helper.make_node("Mul", [raw, a_name], [mid], name=f"{normalised}.nchw_mul"))
    for node in readers:
        for i, name in enumerate(node.input):
            if name == normalised:
                node.input[i] = out


def _affine_chain(conv, producer, inits):
    """(transpose, add, mul) when the conv reads Transpose(Add(Mul(x, a[C]), b[C])) and has no padding."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in conv.attribute}
    if any(attrs.get("pads", [0])) or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID"):
        return None  # padded zeros would be normalised differently
    if conv.input[1] not in inits or attrs.get("group", 1) != 1:
        return None
    transpose = producer.get(conv.input[0])
    add = producer.get(transpose.input[0]) if transpose is not None and transpose.op_type == "Transpose" else None
    mul = producer.get(add.input[0]) if add is not None and add.op_type == "Add" else None
    if mul is None or mul.op_type != "Mul" or mul.input[1] not in inits or add.input[1] not in inits:
        return None
    channels = numpy_helper.to_array(inits[conv.input[1]]).shape[1]
    for name in (mul.input[1], add.input[1]):
        if list(inits[name].dims) != [channels]:
            return None
    perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), None)
    if perm is None or perm[1] != len(perm) - 1:  # the channel axis must be the last one before the transpose
        return None
    return transpose, add, mul


def _drop_dead_nodes(graph) -> None:
    """Removes nodes whose outputs nothing reads (not the graph's outputs either), then unused initializers."""
    while True:
        read = {name for node in graph.node for name in node.input} | {out.name for out in graph.output}
        dead = [node for node in graph.node if not any(out in read for out in node.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    read = {name for node in graph.node for name in node.input}
    for init in [i for i in graph.initializer if i.name not in read]:
        graph.initializer.remove(init)


def policy_layer_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes that use the policy's own fusion and head weights (FP32_LAYERS), which stay fp32."""
    return [
        node.name
        for node in model.graph.node
        if node.op_type in QUANTIZED_OPS and any(name.startswith(FP32_LAYERS) for name in node.input)
    ]


# --- 2. static quantization ------------------------------------------------------------------------


class _FeedsReader(CalibrationDataReader):
    """The calibration feeds, one step at a time, as onnxruntime.quantization asks for them."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def quantize_file(source: Path, target: Path, calibration: list[dict[str, np.ndarray]]) -> str:
    """Quantizes `source` (the fp32 step graph) into `target`: fold, then static QDQ; returns how it did."""
    model = onnx.load(str(source))
    folded = fold_pixel_affine(model)
    kept = policy_layer_nodes(model)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        prepared = Path(tmp) / "folded.onnx"
        onnx.save(model, str(prepared))
        quantize_static(
            str(prepared),
            str(target),
            _FeedsReader(calibration),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=QUANTIZED_OPS,
            per_channel=True,
            reduce_range=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=kept,
        )
    return (
        f"onnxruntime.quantization.quantize_static {ort.__version__} (QDQ, {'/'.join(QUANTIZED_OPS)}, "
        f"per-channel int8 weights, reduce_range, uint8 activations, {len(calibration)} calibration batches, "
        f"{len(kept)} policy-head/fusion node(s) kept fp32; "
        f"pixel normalisation folded into {folded} patch convolution(s))"
    )


# --- 3. parity against fp32 ------------------------------------------------------------------------


def measure_int8_parity(
    fp32_session,
    int8_session,
    preprocessing,
    encode_text,
    memory: tuple[int, int],
    frames: parity.Frames,
    calibration: str,
    calibration_steps: int,
    seed: int = 0,
) -> Int8Parity:
    """Every figure of Int8Parity; raises ModelError (naming each figure over tolerance) if one is."""
    figures = graph_parity.compare_steps(
        graph_parity.session_step(fp32_session),
        graph_parity.session_step(int8_session),
        preprocessing,
        encode_text,
        memory,
        frames.images,
        parity.PARITY_BATCHES,
        seed,
    )
    result = Int8Parity(
        method=INT8_METHOD,
        frames=frames.source,
        calibration=calibration,
        calibration_steps=calibration_steps,
        actions_tolerance=INT8_ACTIONS_TOLERANCE,
        confidence_tolerance=INT8_CONFIDENCE_TOLERANCE,
        max_abs_diff=figures,
    )
    failures = int8_failures(result)
    if failures:
        raise ModelError(
            "int8 export refused, the int8 graph answers too differently from fp32: "
            + "; ".join(failures)
            + " (no model.int8.onnx written; serve fp32 or fp16 for this version)"
        )
    return result


def int8_failures(figures: Int8Parity) -> list[str]:
    """Every actions / confidence figure above its tolerance (NaN and inf count), as readable lines."""
    tolerances = {"actions": figures.actions_tolerance, "confidence": figures.confidence_tolerance}
    return graph_parity.over_tolerance(figures.max_abs_diff, tolerances)


# --- the whole step --------------------------------------------------------------------------------


def calibration_frames(count: int, size: int, data_dir: str | Path | None) -> parity.Frames:
    """Frames for calibration: from the dataset (every other one of a draw twice as large, so the parity
    check's frames from the same folder are not all reused), else MiniWorld renders with another seed.
    """
    if data_dir is None:
        return parity.parity_frames(count, size, None, seed=CALIBRATION_SEED)
    drawn = parity.parity_frames(2 * count, size, data_dir)
    return parity.Frames(drawn.images[1::2][:count], drawn.source + ":odd-frames")


def quantize_step_graph(
    folder: Path,
    signature: ExportSignature,
    preprocessing,
    frames: parity.Frames,
    data_dir: str | Path | None = None,
    encode_text: Callable[[np.ndarray], np.ndarray] | None = None,
    say: Callable[[str], None] | None = None,
) -> tuple[Int8Parity, str]:
    """Writes `folder/model.int8.onnx` from `folder/<step_fp32 file>` when its parity passes.

    Args:
        folder: the folder holding signature.json's graphs (an export's scratch folder or a version's onnx/).
        signature: its signature (the fp32 step graph and the recurrent shape are read from it).
        preprocessing: the saved preprocessing (tokenizer, window).
        frames: the parity check's frames.
        data_dir: dataset folder for the calibration frames (None: MiniWorld renders).
        encode_text: clip_input_ids -> clip_text (None: the exported text encoder graph).
        say: progress lines.

    Returns:
        The parity figures and how the graph was made (ExporterInfo.int8_quantizer).

    Raises:
        ModelError: parity out of tolerance or the quantizer failed; `model.int8.onnx` is then absent.
    """
    say = say or (lambda text: log.info("%s", text))
    if signature.graph("step_fp32").external_data:
        raise ModelError(
            "int8 export of graphs over 2 GB (weights in a side file) is not supported: int8 is for CPU-sized models"
        )
    fp32 = parity.cpu_session(folder / signature.graph("step_fp32").file)
    if encode_text is None:
        text = parity.cpu_session(folder / signature.graph("text_encoder").file)

        def encode_text(ids: np.ndarray) -> np.ndarray:
            return text.run(None, {"clip_input_ids": ids})[0]

    memory = (signature.recurrent.layers, signature.recurrent.hidden)
    steps = preprocessing.window
    calibration = calibration_frames(CALIBRATION_SEQUENCES * steps, preprocessing.image_size, data_dir)
    say(f"calibrating int8 on {CALIBRATION_SEQUENCES} x {steps} frames ({calibration.source})")
    feeds = graph_parity.recurrent_feeds(
        graph_parity.session_step(fp32), preprocessing, encode_text, memory, calibration.images, steps, CALIBRATION_SEED
    )
    target = folder / STEP_INT8_FILE
    partial = folder / f".{STEP_INT8_FILE}.partial"
    try:
        try:
            how = quantize_file(folder / signature.graph("step_fp32").file, partial, feeds)
        except Exception as exc:  # the quantizer raises its own errors
            raise ModelError(
                f"int8 quantization failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            ) from None
        say("measuring int8 parity against fp32")
        figures = measure_int8_parity(
            fp32,
            parity.cpu_session(partial),
            preprocessing,
            encode_text,
            memory,
            frames,
            calibration.source,
            len(feeds),
        )
        shutil.move(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return figures, how
