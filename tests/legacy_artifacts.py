"""Model versions as older code wrote them, built from a current export (for compatibility tests)."""

from __future__ import annotations

import json
from pathlib import Path

import onnx

from mobile_vla.export.signature import SAFETY_OUTPUTS, SIGNATURE_FILE, file_sha256


def downgrade_to_signature_v1(model_dir: Path) -> Path:
    """Rewrites `model_dir/onnx` as a signature_version 1 export: the step graphs lose the outputs
    version 2 added (confidence_now, vision_features) and signature.json describes them as version 1 did.
    """
    folder = Path(model_dir) / "onnx"
    path = folder / SIGNATURE_FILE
    signature = json.loads(path.read_text())
    keep = lambda specs: [s for s in specs if s["name"] not in SAFETY_OUTPUTS]  # noqa: E731
    for key, graph in signature["graphs"].items():
        if not key.startswith("step"):
            continue
        model = onnx.load(str(folder / graph["file"]))
        outputs = [o for o in model.graph.output if o.name not in SAFETY_OUTPUTS]
        del model.graph.output[:]
        model.graph.output.extend(outputs)
        onnx.save(model, str(folder / graph["file"]))
        graph["outputs"] = keep(graph["outputs"])
        graph["sha256"] = file_sha256(folder / graph["file"])
        graph["bytes"] = (folder / graph["file"]).stat().st_size
    signature["outputs"] = keep(signature["outputs"])
    signature["signature_version"] = 1
    path.write_text(json.dumps(signature, indent=2) + "\n")
    return model_dir
