"""One predict interface over TensorRT, ONNX Runtime (CUDA, CPU) and PyTorch, behind a verified fallback chain.

    backend = load_backend(model_dir)            # tries tensorrt, onnx-cuda, onnx-cpu, torch in that order
    backend.name, backend.skipped                # "onnx-cpu", {"tensorrt": "TensorRT is not installed ...", ...}
    out = backend.predict(images, state, ["go to the red box"] * B, memory=None)
    out.actions [B,K,3] (m/s, m/s, rad/s) · out.confidence [B] · out.memory (h, c) [layers,B,hidden]

The chain goes from the fastest to the most portable, and a backend is only chosen after it has
loaded, matched signature.json and answered one self-test step; every skip keeps its reason, so an
operator sees why a GPU replica runs on the CPU. All backends share the code around the graph
(validation, tokenisation, the per-instruction CLIP text cache, state scaling, action de-normalisation),
so they can only differ in the step itself - and the tests check they agree.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mobile_vla.errors import ConfigError, DataError, MobileVLAError, ModelError, ResourceError
from mobile_vla.export.signature import (
    STEP_OUTPUTS,
    TEXT_OUTPUTS,
    ExportSignature,
    GraphFile,
    TensorSpec,
    check_io_matches,
    load_signature,
    verify_graph_file,
)

log = logging.getLogger(__name__)

BACKEND_NAMES = ("tensorrt", "onnx-cuda", "onnx-cpu", "torch")
ONNX_DIR = "onnx"
SELF_TEST_INSTRUCTION = "go forward to the target"
KOSMOS_KEYS = ("kosmos_input_ids", "kosmos_attention_mask", "kosmos_image_embeds_position_mask")


@dataclass
class BackendOutput:
    actions: np.ndarray  # float32 [B, K, 3], de-normalised (m/s, m/s, rad/s)
    confidence: np.ndarray  # float32 [B], in [0, 1]
    memory: tuple[np.ndarray, np.ndarray]  # (h, c) float32 [layers, B, hidden]


class _InstructionCache:
    """LRU of per-instruction rows (Kosmos tokens + CLIP text feature): robots repeat instructions."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._rows: OrderedDict[str, tuple[dict[str, np.ndarray], np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def lookup(
        self, instructions: list[str], encode: Callable[[list[str]], tuple[dict[str, np.ndarray], np.ndarray]]
    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        with self._lock:
            missing = list(dict.fromkeys(t for t in instructions if t not in self._rows))
            self.hits += len(instructions) - len(missing)
            self.misses += len(missing)
        if missing:
            tokens, clip_text = encode(missing)  # outside the lock: may take a few ms
            with self._lock:
                for i, text in enumerate(missing):
                    self._rows[text] = ({k: tokens[k][i] for k in KOSMOS_KEYS}, clip_text[i])
        with self._lock:
            rows = []
            for text in instructions:
                row = self._rows.get(text)
                if row is None:  # evicted by a concurrent caller meanwhile: encode it again
                    tokens, clip_text = encode([text])
                    row = ({k: tokens[k][0] for k in KOSMOS_KEYS}, clip_text[0])
                self._rows[text] = row
                self._rows.move_to_end(text)
                rows.append(row)
            while len(self._rows) > self.size:
                self._rows.popitem(last=False)
        stacked = {k: np.stack([r[0][k] for r in rows]) for k in KOSMOS_KEYS}
        return stacked, np.stack([r[1] for r in rows]).astype(np.float32)


class Backend:
    """Validation, tokens, text cache, state and action scaling around one step; subclasses run the step."""

    name = "base"

    def __init__(
        self,
        model_dir: Path,
        signature: ExportSignature,
        preprocessing,
        cache_size: int = 1024,
    ) -> None:
        self.model_dir = model_dir
        self.signature = signature
        self.preprocessing = preprocessing
        self.model_name = signature.model.name
        self.model_version = signature.model.version
        self.skipped: dict[str, str] = {}
        self.max_batch: int | None = None  # None = any batch size in one call
        self._cache = _InstructionCache(cache_size)
        self.image_size = signature.preprocessing.image_size
        self.state_dim = signature.preprocessing.state_dim
        self.layers = signature.recurrent.layers
        self.hidden = signature.recurrent.hidden

    # --- what subclasses provide -------------------------------------------------------------
    def _encode_text(self, clip_input_ids: np.ndarray) -> np.ndarray:
        """clip_input_ids int64 [N, 77] -> clip_text float32 [N, D]."""
        raise NotImplementedError

    def _step(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Feeds named as STEP_INPUTS (numpy) -> outputs named as STEP_OUTPUTS (numpy float32)."""
        raise NotImplementedError

    def close(self) -> None:
        """Frees sessions / engines (a hot swap drops the old backend)."""

    # --- the shared interface ----------------------------------------------------------------
    def initial_memory(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        shape = (self.layers, batch_size, self.hidden)
        return np.zeros(shape, np.float32), np.zeros(shape, np.float32)

    @property
    def cache_stats(self) -> dict[str, int]:
        return {"hits": self._cache.hits, "misses": self._cache.misses, "size": len(self._cache._rows)}

    def predict(
        self,
        images: np.ndarray,
        state: np.ndarray,
        instructions: list[str],
        memory: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> BackendOutput:
        """Images uint8 [B,224,224,3] (already prepared), state float32 [B,S] raw, one instruction per row."""
        images, state, memory = self._validate(images, state, instructions, memory)
        batch = images.shape[0]
        tokens, clip_text = self._cache.lookup(list(instructions), self._encode_instructions)
        feeds = {
            "images": images,
            "state": np.asarray(self.preprocessing.normalise_state(state), dtype=np.float32),
            "clip_text": clip_text,
            **{k: tokens[k].astype(np.int64, copy=False) for k in KOSMOS_KEYS},
            "h_in": memory[0],
            "c_in": memory[1],
        }
        step = self.max_batch or batch
        if step >= batch:
            out = self._step(feeds)
        else:  # an engine with a largest batch (TensorRT profile): run slices, join them
            parts = [self._step(_rows(feeds, i, i + step)) for i in range(0, batch, step)]
            out = {
                k: np.concatenate([p[k] for p in parts], axis=1 if k in ("h_out", "c_out") else 0) for k in STEP_OUTPUTS
            }
        actions = np.asarray(self.preprocessing.denormalise_actions(out["actions"]), dtype=np.float32)
        return BackendOutput(
            actions=actions,
            confidence=out["confidence"].astype(np.float32, copy=False),
            memory=(out["h_out"].astype(np.float32, copy=False), out["c_out"].astype(np.float32, copy=False)),
        )

    def _encode_instructions(self, texts: list[str]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        tokens = self.preprocessing.tokenize(texts)
        return tokens, self._encode_text(np.asarray(tokens["clip_input_ids"], dtype=np.int64))

    def _validate(self, images, state, instructions, memory):
        size = self.image_size
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (size, size, 3):
            raise DataError(
                f"images: expected uint8 [B,{size},{size},3], got {images.dtype} {list(images.shape)} "
                f"(resize frames with Preprocessing.prepare_image)"
            )
        batch = images.shape[0]
        if batch == 0:
            raise DataError("images: empty batch")
        state = np.asarray(state, dtype=np.float32)
        if state.shape != (batch, self.state_dim):
            raise DataError(f"state: expected [{batch},{self.state_dim}], got {list(state.shape)}")
        if not np.isfinite(state).all():
            raise DataError("state: contains NaN or inf")
        if isinstance(instructions, str) or len(instructions) != batch:
            raise DataError(f"instructions: expected a list of {batch} strings, got {instructions!r:.80}")
        if not all(isinstance(t, str) and t.strip() for t in instructions):
            raise DataError("instructions: every instruction must be a non-empty string")
        if memory is None:
            memory = self.initial_memory(batch)
        else:
            want = (self.layers, batch, self.hidden)
            if len(memory) != 2:
                raise DataError("memory: expected a pair (h, c)")
            memory = tuple(np.asarray(m, dtype=np.float32) for m in memory)
            for label, part in zip("hc", memory):
                if part.shape != want:
                    raise DataError(f"memory {label}: expected {list(want)}, got {list(part.shape)}")
                if not np.isfinite(part).all():
                    raise DataError(f"memory {label}: contains NaN or inf")
        return np.ascontiguousarray(images), state, memory

    def self_test(self) -> None:
        """One real step at batch 1; a backend that cannot answer it never gets chosen."""
        out = self.predict(
            np.zeros((1, self.image_size, self.image_size, 3), np.uint8),
            np.zeros((1, self.state_dim), np.float32),
            [SELF_TEST_INSTRUCTION],
        )
        if out.actions.shape != (1, self.signature.chunk, 3) or not np.isfinite(out.actions).all():
            raise ModelError(f"{self.name}: self-test step gave actions {out.actions.shape} with non-finite values")
        if not np.isfinite(out.confidence).all():
            raise ModelError(f"{self.name}: self-test step gave a non-finite confidence")

    def describe(self) -> dict:
        return {
            "backend": self.name,
            "model": {"name": self.model_name, "version": self.model_version},
            "skipped": dict(self.skipped),
        }


def _rows(feeds: dict[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
    """A batch slice (the recurrent state carries its batch on axis 1)."""
    return {k: (v[:, start:stop] if k in ("h_in", "c_in") else v[start:stop]) for k, v in feeds.items()}


# --- ONNX Runtime ----------------------------------------------------------------------------------

_ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
}


def _session_io(args) -> list[TensorSpec]:
    specs = []
    for arg in args:
        dtype = _ORT_DTYPES.get(arg.type)
        if dtype is None:
            raise ModelError(f"graph {arg.name!r} has unsupported type {arg.type}")
        shape = [d if isinstance(d, int) else "B" for d in arg.shape]
        specs.append(TensorSpec(name=arg.name, dtype=dtype, shape=shape))
    return specs


def open_session(folder: Path, graph: GraphFile, providers: list[str], threads: int = 0, spinning: bool = True):
    """An ONNX Runtime session for a graph named in signature.json, refused unless bytes and I/O match.

    `threads`: intra-op threads (0: ORT's default, one per core). `spinning=False` stops idle pool
    threads from busy-waiting: a serving replica shares its cores with the ingress and the proxy.
    """
    import onnxruntime as ort

    path = verify_graph_file(folder, graph)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # ORT raises its own Fail/InvalidProtobuf/... classes
        raise ModelError(f"{path}: ONNX Runtime cannot load it: {str(exc).splitlines()[0][:300]}") from None
    check_io_matches(str(path), graph.inputs, _session_io(session.get_inputs()), "inputs")
    check_io_matches(str(path), graph.outputs, _session_io(session.get_outputs()), "outputs")
    return session


class OnnxBackend(Backend):
    """ONNX Runtime on the CPU or on CUDA: needs no torch at run time."""

    def __init__(
        self,
        model_dir,
        signature,
        preprocessing,
        device: str,
        fp16: bool,
        threads: int = 0,
        spinning: bool = True,
        **kw,
    ):
        import onnxruntime as ort

        super().__init__(model_dir, signature, preprocessing, **kw)
        self.name = f"onnx-{device}"
        if device == "cuda":
            available = ort.get_available_providers()
            if "CUDAExecutionProvider" not in available:
                raise ResourceError(
                    f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (has {available}); "
                    "install onnxruntime-gpu on GPU nodes"
                )
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        folder = model_dir / ONNX_DIR
        step_key = "step_fp16" if fp16 else "step_fp32"
        if step_key not in signature.graphs:
            raise ModelError(
                f"{folder}: no {step_key} graph (export with --fp16)" if fp16 else f"{folder}: no {step_key} graph"
            )
        self.session = open_session(folder, signature.graphs[step_key], providers, threads, spinning)
        if device == "cuda" and self.session.get_providers()[0] != "CUDAExecutionProvider":
            raise ResourceError(f"CUDAExecutionProvider did not initialise (providers: {self.session.get_providers()})")
        check_io_matches(
            str(folder / signature.graphs[step_key].file),
            signature.inputs,
            _session_io(self.session.get_inputs()),
            "inputs",
        )
        self.text_session = open_session(folder, signature.graph("text_encoder"), providers, threads, spinning)
        self.precision = "fp16" if fp16 else "fp32"

    def _encode_text(self, clip_input_ids):
        return self.text_session.run(TEXT_OUTPUTS, {"clip_input_ids": clip_input_ids})[0]

    def _step(self, feeds):
        return dict(zip(STEP_OUTPUTS, self.session.run(STEP_OUTPUTS, feeds)))

    def close(self):
        self.session = self.text_session = None


# --- PyTorch -------------------------------------------------------------------------------------


class TorchBackend(Backend):
    """The reference: the saved policy itself (GPU if there is one), the last resort of the chain."""

    name = "torch"

    def __init__(self, model_dir, signature, preprocessing, model, **kw):
        import torch

        super().__init__(model_dir, signature, preprocessing, **kw)
        self._torch = torch
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device).eval()

    def _tensor(self, array):
        return self._torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def _encode_text(self, clip_input_ids):
        with self._torch.inference_mode():
            return self.model.encode_instruction(self._tensor(clip_input_ids)).float().cpu().numpy()

    def _step(self, feeds):
        t = {k: self._tensor(v) for k, v in feeds.items()}
        with self._torch.inference_mode():
            actions, confidence, (h, c) = self.model.step(
                t["images"],
                t["state"],
                {k: t[k] for k in KOSMOS_KEYS},
                (t["h_in"], t["c_in"]),
                clip_text=t["clip_text"],
            )
        out = (actions, confidence, h, c)
        return {k: v.float().cpu().numpy() for k, v in zip(STEP_OUTPUTS, out)}

    def close(self):
        self.model = None


# --- TensorRT ------------------------------------------------------------------------------------


class TensorRTBackend(Backend):
    """A TensorRT plan for this GPU; the (cached, once per instruction) text encoder runs in ONNX Runtime."""

    name = "tensorrt"

    def __init__(self, model_dir, signature, preprocessing, fp16: bool, threads: int = 0, spinning: bool = True, **kw):
        from mobile_vla.export.tensorrt_engine import TensorRTRunner

        super().__init__(model_dir, signature, preprocessing, **kw)
        self.runner = TensorRTRunner(model_dir, signature, fp16=fp16)  # checks TensorRT, GPU, plan
        self.max_batch = self.runner.max_batch
        import onnxruntime as ort
        import torch

        self._torch = torch
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        self.text_session = open_session(
            model_dir / ONNX_DIR, signature.graph("text_encoder"), providers, threads, spinning
        )

    def _encode_text(self, clip_input_ids):
        return self.text_session.run(TEXT_OUTPUTS, {"clip_input_ids": clip_input_ids})[0]

    def _step(self, feeds):
        torch = self._torch
        outs = self.runner.run({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()})
        return {k: outs[k].float().cpu().numpy() for k in STEP_OUTPUTS}

    def close(self):
        self.runner = self.text_session = None


# --- the chain -----------------------------------------------------------------------------------


def _check_preprocessing(signature: ExportSignature, preprocessing, where: str) -> None:
    """signature.json and the saved preprocessing must describe the same scaling (no silent drift)."""
    spec = signature.preprocessing
    pairs = {
        "state_mean": (spec.state_mean, preprocessing.state_mean),
        "state_std": (spec.state_std, preprocessing.state_std),
        "action low": (signature.actions.low, preprocessing.action_low),
        "action high": (signature.actions.high, preprocessing.action_high),
    }
    for field, (a, b) in pairs.items():
        if not np.allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=1e-6, atol=1e-7):
            raise ModelError(
                f"{where}: {field} in signature.json {list(a)} differs from policy/preprocessing {list(b)}"
            )
    if spec.chunk != preprocessing.chunk or spec.state_dim != preprocessing.state_dim:
        raise ModelError(f"{where}: chunk/state_dim in signature.json differ from policy/preprocessing")


def _resolve(model_dir) -> tuple[Path, str | None, str | None]:
    from mobile_vla.tracking import resolve_model

    resolved = resolve_model(model_dir)
    return Path(resolved.path), resolved.name, resolved.version


def load_backend(
    model_dir: str | Path,
    prefer: tuple[str, ...] | list[str] = BACKEND_NAMES,
    fp16: bool = False,
    *,
    threads: int = 0,
    spinning: bool = True,
    cache_size: int = 1024,
    self_test: bool = True,
) -> Backend:
    """The first backend in `prefer` that loads, matches its signature and passes a self-test step.

    `model_dir`: a resolved model folder (policy/, onnx/, tensorrt/) or a models:/ URI. `fp16` picks the
    fp16 ONNX graph / TensorRT plan (torch stays fp32: it is the reference). Raises ModelError naming
    every backend's reason when none works.
    """
    unknown = [p for p in prefer if p not in BACKEND_NAMES]
    if unknown or not prefer:
        raise ConfigError(f"prefer = {list(prefer)!r}: expected names from {list(BACKEND_NAMES)}")
    folder, name, version = _resolve(model_dir)
    skipped: dict[str, str] = {}
    signature = preprocessing = None
    signature_error = None
    try:
        signature = load_signature(folder / ONNX_DIR)
    except ModelError as exc:
        signature_error = str(exc)

    def onnx_parts():
        if signature is None:
            raise ModelError(signature_error)
        nonlocal preprocessing
        if version is not None and signature.model.version not in (None, version):
            raise ModelError(
                f"{folder / ONNX_DIR}: exported from model version {signature.model.version}, this is version {version}"
            )
        if preprocessing is None:
            from mobile_vla.policy.preprocessing import Preprocessing

            preprocessing = Preprocessing.load(folder / signature.preprocessing.saved_at)
            _check_preprocessing(signature, preprocessing, str(folder))
        return signature, preprocessing

    for choice in prefer:
        try:
            if choice == "torch":
                backend = _load_torch(folder, signature, name, version, cache_size)
            elif choice == "tensorrt":
                sig, prep = onnx_parts()
                backend = TensorRTBackend(
                    folder, sig, prep, fp16=fp16, threads=threads, spinning=spinning, cache_size=cache_size
                )
            else:
                sig, prep = onnx_parts()
                device = "cuda" if choice == "onnx-cuda" else "cpu"
                backend = OnnxBackend(
                    folder,
                    sig,
                    prep,
                    device=device,
                    fp16=fp16,
                    threads=threads,
                    spinning=spinning,
                    cache_size=cache_size,
                )
            if self_test:
                backend.self_test()
        except Exception as exc:  # any failure of one backend is a reason to try the next one
            if not isinstance(exc, (MobileVLAError, ImportError, OSError)):
                log.warning("backend %s failed unexpectedly", choice, exc_info=True)
            skipped[choice] = f"{type(exc).__name__}: {exc}"
            log.info("backend %s skipped: %s", choice, skipped[choice])
            continue
        backend.skipped = skipped
        if skipped:
            log.warning("serving %s on %s; skipped: %s", folder, choice, skipped)
        return backend
    reasons = "; ".join(f"{k}: {v}" for k, v in skipped.items())
    raise ModelError(f"{folder}: no backend could serve this model ({reasons})")


def _load_torch(folder: Path, signature: ExportSignature | None, name, version, cache_size) -> TorchBackend:
    """The saved policy, described afresh (the ONNX signature may be damaged or from another version)."""
    from mobile_vla.export.onnx_export import describe_policy
    from mobile_vla.policy import load_policy

    model, preprocessing = load_policy(folder)
    if preprocessing is None:
        raise ModelError(f"{folder}: the saved policy has no preprocessing (cannot scale state or actions)")
    if name is None and version is None and signature is not None:
        name, version = signature.model.name, signature.model.version
    described = describe_policy(model, preprocessing, name=name, version=version)
    return TorchBackend(folder, described, preprocessing, model, cache_size=cache_size)
