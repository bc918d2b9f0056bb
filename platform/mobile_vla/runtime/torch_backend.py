"""PyTorch: the saved policy itself (on the GPU if there is one), the reference and the last resort."""

from __future__ import annotations

import numpy as np
import torch

from mobile_vla.errors import ModelError
from mobile_vla.export.onnx_export import describe_policy
from mobile_vla.export.signature import STEP_OUTPUTS
from mobile_vla.policy import load_policy
from mobile_vla.runtime.base import KOSMOS_KEYS, Backend, LoadOptions, ModelFiles
from mobile_vla.runtime.registry import BackendSpec


class TorchBackend(Backend):
    """The saved policy run eagerly; needs no export, so it serves a version whose export is missing or bad."""

    @classmethod
    def open(cls, name: str, spec: BackendSpec, model: ModelFiles, options: LoadOptions) -> TorchBackend:
        """The saved policy, described afresh (the ONNX signature may be damaged or from another version)."""
        policy, preprocessing = load_policy(model.folder)
        if preprocessing is None:
            raise ModelError(f"{model.folder}: the saved policy has no preprocessing (cannot scale state or actions)")
        model_name, version = model.name, model.version
        if model_name is None and version is None and model.signature is not None:
            model_name, version = model.signature.model.name, model.signature.model.version
        described = describe_policy(policy, preprocessing, name=model_name, version=version)
        backend = cls(name, model.folder, described, preprocessing, options.cache_size)
        backend.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        backend.model = policy.to(backend.device).eval()
        return backend

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def _encode_text(self, clip_input_ids):
        with torch.inference_mode():
            return self.model.encode_instruction(self._tensor(clip_input_ids)).float().cpu().numpy()

    def _step(self, feeds):
        t = {k: self._tensor(v) for k, v in feeds.items()}
        with torch.inference_mode():
            out = self.model.step_with_safety(
                t["images"],
                t["state"],
                {k: t[k] for k in KOSMOS_KEYS},
                (t["h_in"], t["c_in"]),
                clip_text=t["clip_text"],
            )
        h, c = out.memory
        values = (out.actions, out.confidence, h, c, out.confidence_now, out.vision_features)
        return {k: v.float().cpu().numpy() for k, v in zip(STEP_OUTPUTS, values, strict=True)}

    def close(self):
        self.model = None
