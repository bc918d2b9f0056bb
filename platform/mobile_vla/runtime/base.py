"""What every backend shares: the predict interface, and what a backend is given to open itself.

    out = backend.predict(images, state, ["go to the red box"] * B, memory=None)
    out.actions [B,K,3] (m/s, m/s, rad/s) · out.confidence [B] · out.memory (h, c) [layers,B,hidden]
    out.confidence_now [B] (k=0) · out.novelty [B] or None (novelty off: `backend.safety_note` says why)

Novelty: the version's `policy/safety_calibration.json` (policy/novelty.py, written at training time)
scores the step graph's `vision_features` output. A version without that file, or exported under
signature version 1 (no such output), serves with novelty off; `describe()` says so.

`Backend` holds the code around the graph (validation, tokenisation, the per-instruction text cache,
state scaling, action de-normalisation, batch slicing), so backends can only differ in the step
itself. A subclass provides `open`, `_encode_text` and `_step`; a `BackendSpec` is its row in the
`BACKENDS` table (runtime/registry.py); `ModelFiles` is the model folder with its export, read and
checked once for all the backends the fallback chain tries.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mobile_vla.errors import ConfigError, DataError, ModelError
from mobile_vla.export.signature import ONNX_DIR, ExportSignature, load_signature
from mobile_vla.policy.novelty import SAFETY_FILE, SafetyCalibration, load_safety_calibration
from mobile_vla.policy.preprocessing import Preprocessing
from mobile_vla.runtime.instruction_cache import InstructionCache
from mobile_vla.runtime.registry import BackendSpec

SELF_TEST_INSTRUCTION = "go forward to the target"
KOSMOS_KEYS = ("kosmos_input_ids", "kosmos_attention_mask", "kosmos_image_embeds_position_mask")
RECURRENT_FEEDS = ("h_in", "c_in")  # the feeds whose batch is axis 1
RECURRENT_OUTPUTS = ("h_out", "c_out")

TextRow = tuple[dict[str, np.ndarray], np.ndarray]  # one instruction: Kosmos tokens [L] each, CLIP text [D]


@dataclass
class BackendOutput:
    """One batched step: de-normalised actions, confidence, the next recurrent state and the safety inputs."""

    actions: np.ndarray  # float32 [B, K, 3], de-normalised (m/s, m/s, rad/s)
    confidence: np.ndarray  # float32 [B], in [0, 1]
    memory: tuple[np.ndarray, np.ndarray]  # (h, c) float32 [layers, B, hidden]
    confidence_now: np.ndarray | None = None  # float32 [B]: the executed step's (k=0); None for a v1 export
    novelty: np.ndarray | None = None  # float32 [B]; None with novelty off

    def nonfinite_rows(self) -> list[int]:
        """Rows (robots) whose actions, confidence or next memory hold NaN or inf: a fault of that row only."""
        h, c = self.memory
        B = self.actions.shape[0]
        good = (
            np.isfinite(self.actions.reshape(B, -1)).all(axis=1)
            & np.isfinite(self.confidence.reshape(B))
            & np.isfinite(np.moveaxis(h, 1, 0).reshape(B, -1)).all(axis=1)  # [layers, B, hidden] -> [B, ...]
            & np.isfinite(np.moveaxis(c, 1, 0).reshape(B, -1)).all(axis=1)
        )
        return [int(b) for b in np.flatnonzero(~good)]


@dataclass(frozen=True)
class LoadOptions:
    """What `load_backend` was asked for, handed to every backend it tries.

    Args:
        fp16: the fp16 ONNX graph / TensorRT plan (torch stays fp32: it is the reference).
        int8: the int8 ONNX graph (model.int8.onnx; ONNX Runtime only: TensorRT has no int8 plans).
        threads: ONNX Runtime intra-op threads (0: one per core).
        spinning: whether idle ONNX Runtime pool threads busy-wait (False for serving replicas).
        cache_size: instructions kept by the per-instruction text cache.
        max_batch_size: the serve config's batch (None: any); a TensorRT plan whose profile stops
            below it is refused (check_plan_batch).

    Raises:
        ConfigError: fp16 and int8 both asked.
    """

    fp16: bool = False
    int8: bool = False
    threads: int = 0
    spinning: bool = True
    cache_size: int = 1024
    max_batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.fp16 and self.int8:
            raise ConfigError("fp16 and int8 exclude each other: choose one precision")

    @property
    def precision(self) -> str:
        """The step graph's precision, "fp32", "fp16" or "int8" (its key in signature.json: step_<precision>)."""
        return "int8" if self.int8 else "fp16" if self.fp16 else "fp32"


class ModelFiles:
    """A resolved model folder; its signature and preprocessing are read and checked once, on first use.

    Args:
        folder: the local model folder (policy/, onnx/, tensorrt/).
        name: registered model name, or None for a plain folder.
        version: registered version, or None for a plain folder.
    """

    def __init__(self, folder: Path, name: str | None, version: str | None) -> None:
        self.folder, self.name, self.version = folder, name, version
        self.signature: ExportSignature | None = None  # None: no valid onnx/signature.json
        self._signature_error = ""
        self._preprocessing: Preprocessing | None = None
        try:
            self.signature = load_signature(folder / ONNX_DIR)
        except ModelError as exc:
            self._signature_error = str(exc)

    def exported(self) -> tuple[ExportSignature, Preprocessing]:
        """The export's signature and the saved preprocessing, or the ModelError that rules the export out."""
        signature = self.signature
        if signature is None:
            raise ModelError(self._signature_error)
        if self.version is not None and signature.model.version not in (None, self.version):
            raise ModelError(
                f"{self.folder / ONNX_DIR}: exported from model version {signature.model.version}, "
                f"this is version {self.version}"
            )
        if self._preprocessing is None:
            preprocessing = Preprocessing.load(self.folder / signature.preprocessing.saved_at)
            _check_preprocessing(signature, preprocessing, str(self.folder))
            self._preprocessing = preprocessing
        return signature, self._preprocessing


def _check_preprocessing(signature: ExportSignature, preprocessing: Preprocessing, where: str) -> None:
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


class Backend:
    """Validation, tokens, text cache, state and action scaling around one step; subclasses run the step.

    Args:
        name: the backend's name in the `BACKENDS` table (what `describe()` and the serving metrics report).
        model_dir: the model folder it serves from.
        signature: the contract it serves under (signature.json, or described from the policy).
        preprocessing: the saved scaling and tokenizer.
        cache_size: instructions kept by the text cache.
    """

    def __init__(
        self,
        name: str,
        model_dir: Path,
        signature: ExportSignature,
        preprocessing: Preprocessing,
        cache_size: int = 1024,
    ) -> None:
        self.name = name
        self.model_dir = model_dir
        self.signature = signature
        self.preprocessing = preprocessing
        self.model_name = signature.model.name
        self.model_version = signature.model.version
        self.skipped: dict[str, str] = {}
        self.max_batch: int | None = None  # None = any batch size in one call
        self._cache: InstructionCache[TextRow] = InstructionCache(cache_size)
        self.image_size = signature.preprocessing.image_size
        self.state_dim = signature.preprocessing.state_dim
        self.layers = signature.recurrent.layers
        self.hidden = signature.recurrent.hidden
        self.safety, self.safety_note = safety_for(model_dir, signature)

    # --- what subclasses provide -------------------------------------------------------------
    @classmethod
    def open(cls, name: str, spec: BackendSpec, model: ModelFiles, options: LoadOptions) -> Backend:
        """Loads this backend for `model`, or raises why it cannot run here (the chain tries the next)."""
        raise NotImplementedError

    def _encode_text(self, clip_input_ids: np.ndarray) -> np.ndarray:
        """clip_input_ids int64 [N, 77] -> clip_text float32 [N, D]."""
        raise NotImplementedError

    def _step(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Feeds named as STEP_INPUTS (numpy) -> outputs named as the signature's (`output_names`; numpy float32)."""
        raise NotImplementedError

    def close(self) -> None:
        """Frees sessions / engines (a hot swap drops the old backend)."""

    # --- the shared interface ----------------------------------------------------------------
    def initial_memory(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        shape = (self.layers, batch_size, self.hidden)
        return np.zeros(shape, np.float32), np.zeros(shape, np.float32)

    @property
    def cache_stats(self) -> dict[str, int]:
        return {"hits": self._cache.hits, "misses": self._cache.misses, "size": len(self._cache)}

    def row_problem(self, state: np.ndarray, h: np.ndarray | None = None, c: np.ndarray | None = None) -> str | None:
        """What is wrong with one robot's input (state [S], memory [layers, hidden]), or None.

        Checked per robot before a batch runs, so one robot's input never fails its batch-mates: a
        state must be finite as float32 and stay finite once normalised ((x - mean) / std overflows
        for values near the float32 limit); memory must be finite.
        """
        state = np.asarray(state, dtype=np.float64)
        if state.shape != (self.state_dim,):
            return f"state: expected {self.state_dim} floats, got shape {list(state.shape)}"
        with np.errstate(over="ignore", invalid="ignore"):
            as_float32 = state.astype(np.float32)
            if not np.isfinite(as_float32).all():
                return "state: contains NaN, inf or a value outside the float32 range"
            normalised = np.asarray(self.preprocessing.normalise_state(as_float32[None]), dtype=np.float32)
        if not np.isfinite(normalised).all():
            bad = int(np.flatnonzero(~np.isfinite(normalised.reshape(-1)))[0])
            return f"state.{bad}: {float(state[bad])!r} is too large for the model (not finite once normalised)"
        for label, part in (("h", h), ("c", c)):
            if part is not None and not np.isfinite(np.asarray(part, dtype=np.float32)).all():
                return f"memory {label}: contains NaN or inf"
        return None

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
        rows = self._cache.lookup(list(instructions), self._encode_instructions)
        feeds = {
            "images": images,
            "state": np.asarray(self.preprocessing.normalise_state(state), dtype=np.float32),
            "clip_text": np.stack([clip for _, clip in rows]).astype(np.float32),  # [B, D]
            **{k: np.stack([tokens[k] for tokens, _ in rows]).astype(np.int64, copy=False) for k in KOSMOS_KEYS},
            "h_in": memory[0],
            "c_in": memory[1],
        }
        step = self.max_batch or batch
        if step >= batch:
            out = self._step(feeds)
        else:  # an engine with a largest batch (TensorRT profile): run slices, join them
            parts = [self._step(_rows(feeds, i, i + step)) for i in range(0, batch, step)]
            out = {
                k: np.concatenate([p[k] for p in parts], axis=1 if k in RECURRENT_OUTPUTS else 0)
                for k in self.signature.output_names
            }
        actions = np.asarray(self.preprocessing.denormalise_actions(out["actions"]), dtype=np.float32)
        confidence_now = out.get("confidence_now")
        novelty = None
        if self.safety is not None:  # vision_features [B, F] -> novelty [B]
            novelty = self.safety.stats.score(out["vision_features"])
        return BackendOutput(
            actions=actions,
            confidence=out["confidence"].astype(np.float32, copy=False),
            memory=(out["h_out"].astype(np.float32, copy=False), out["c_out"].astype(np.float32, copy=False)),
            confidence_now=None if confidence_now is None else confidence_now.astype(np.float32, copy=False),
            novelty=novelty,
        )

    def _encode_instructions(self, texts: list[str]) -> list[TextRow]:
        tokens = self.preprocessing.tokenize(texts)
        clip_text = self._encode_text(np.asarray(tokens["clip_input_ids"], dtype=np.int64))  # [N, D]
        return [({k: tokens[k][i] for k in KOSMOS_KEYS}, clip_text[i]) for i in range(len(texts))]

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
            for label, part in zip("hc", memory, strict=True):
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
            "novelty": self.safety is not None,
            "novelty_note": self.safety_note,
        }


def safety_for(model_dir: Path, signature: ExportSignature) -> tuple[SafetyCalibration | None, str]:
    """The version's safety calibration when novelty can run on it, else None and why not (for /v1/model).

    Raises:
        ModelError: the calibration file exists but is unreadable (a damaged version is not served quietly).
    """
    policy_dir = Path(model_dir) / Path(signature.preprocessing.saved_at).parent
    if not signature.has_safety_outputs:
        return None, (
            f"novelty off: exported under signature_version {signature.signature_version} (no vision_features "
            "output); re-export the version (mobile-vla export) to enable it"
        )
    calibration = load_safety_calibration(policy_dir)
    if calibration is None:
        return None, f"novelty off: the version has no {SAFETY_FILE} (saved without training-set novelty statistics)"
    width = next(s.shape[-1] for s in signature.outputs if s.name == "vision_features")
    if calibration.stats.feature_dim != width:
        return None, (
            f"novelty off: {SAFETY_FILE} has features of width {calibration.stats.feature_dim}, the graph gives {width}"
        )
    return calibration, f"novelty on: statistics of {calibration.stats.frames} training frames"


def _rows(feeds: dict[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
    """A batch slice (the recurrent state carries its batch on axis 1)."""
    return {k: (v[:, start:stop] if k in RECURRENT_FEEDS else v[start:stop]) for k, v in feeds.items()}
