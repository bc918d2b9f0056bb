"""Model versions in the MLflow registry: register, resolve `models:/` URIs, attach artifacts, aliases.

A model version's source is a run-artifact folder `model/` laid out as

    model/
      policy/                         save_policy(): config.json, model.safetensors, preprocessing/
      onnx/                           export: model.onnx, model.fp16.onnx, text_encoder.onnx, signature.json
      tensorrt/<gpu>__trt<ver>/       export --tensorrt: model.plan (one per GPU model and TensorRT version)

Export and engine builds add to that same folder, so everything about a version stays in one place.
`resolve_model()` mirrors it into a local cache (`$MOBILE_VLA_HOME/model_cache/NAME/VERSION`), fetching
only what the cache lacks, so serving replicas and evaluation never re-download a whole model.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from mobile_vla.config import platform_home
from mobile_vla.errors import ModelError
from mobile_vla.tracking.store import configure_mlflow

DEFAULT_MODEL_NAME = "mobile-vla-policy"
# The registered model's aliases: serving follows CHAMPION, which only the promotion gate (or a person)
# moves; training, sweeps and online updates register their result as CHALLENGER.
CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS_CHAMPION = "previous-champion"  # kept for a one-line rollback: promote --from-alias previous-champion --force
MODEL_ARTIFACT_PATH = "model"
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?$")


@dataclass(frozen=True)
class ResolvedModel:
    """A `models:/` URI (or folder) resolved to a local folder, with the version it names."""

    path: Path  # local folder with policy/ (and onnx/, tensorrt/ once exported)
    uri: str
    name: str | None = None
    version: str | None = None
    alias: str | None = None
    run_id: str | None = None

    def to_dict(self) -> dict:
        return {**asdict(self), "path": str(self.path)}


def _client():
    from mlflow import MlflowClient

    configure_mlflow()
    return MlflowClient()


def _not_found(exc: Exception) -> bool:
    return "RESOURCE_DOES_NOT_EXIST" in str(getattr(exc, "error_code", "")) or "not found" in str(exc).lower()


def register_policy(
    model_dir: str | Path,
    run_id: str,
    name: str = DEFAULT_MODEL_NAME,
    alias: str | None = CHALLENGER,
    tags: dict[str, str] | None = None,
    description: str | None = None,
) -> str:
    """Logs `model_dir` (holding `policy/`) under the run and registers it as a new version."""
    model_dir = Path(model_dir)
    if not (model_dir / "policy").is_dir():
        raise ModelError(f"{model_dir}: no policy/ folder to register (expected save_policy output)")
    client = _client()
    client.log_artifacts(run_id, str(model_dir), MODEL_ARTIFACT_PATH)
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{MODEL_ARTIFACT_PATH}"
    try:
        client.create_registered_model(name, description="Mobile VLA policy (Kosmos-2 + CLIP + LSTM)")
    except Exception as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(getattr(exc, "error_code", exc)) and "already exists" not in str(exc):
            raise
    version = client.create_model_version(
        name, source, run_id=run_id, tags={k: str(v) for k, v in (tags or {}).items()}, description=description
    ).version
    if alias:
        client.set_registered_model_alias(name, alias, version)
    return str(version)


def _version_of(client, name: str, alias: str | None, version: str | None, uri: str):
    try:
        if alias:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)
    except Exception as exc:
        if _not_found(exc) or "alias" in str(exc).lower():
            what = f"alias '{alias}'" if alias else f"version {version}"
            raise ModelError(f"{uri}: registered model '{name}' has no {what}") from None
        raise


def _sync_folder(source: str, dest: Path) -> None:
    """Downloads the entries (two levels deep) of an artifact folder that `dest` lacks."""
    from mlflow.artifacts import download_artifacts, list_artifacts

    dest.mkdir(parents=True, exist_ok=True)

    def missing(prefix: str, depth: int) -> list[str]:
        out = []
        for entry in list_artifacts(artifact_uri=f"{source}/{prefix}" if prefix else source):
            rel = entry.path.rsplit("/", 1)[-1]
            rel = f"{prefix}/{rel}" if prefix else rel
            local = dest / rel
            if not local.exists():
                out.append(rel)
            elif entry.is_dir and depth < 2:
                out.extend(missing(rel, depth + 1))
        return out

    for rel in missing("", 1):
        with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
            got = Path(download_artifacts(artifact_uri=f"{source}/{rel}", dst_path=tmp))
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():  # another process may have fetched it meanwhile
                shutil.move(str(got), str(target))


def resolve_model(uri: str | Path) -> ResolvedModel:
    """`models:/NAME@alias`, `models:/NAME/V` or a local folder -> a local folder with the model."""
    text = str(uri)
    if not text.startswith("models:/"):
        path = Path(text).expanduser()
        if not path.is_dir():
            raise ModelError(f"{text}: not a models:/ URI and no such folder")
        meta = path / "model_version.json"
        info = json.loads(meta.read_text()) if meta.is_file() else {}
        return ResolvedModel(path=path.resolve(), uri=text, name=info.get("name"), version=info.get("version"))
    match = _MODELS_URI.match(text)
    if not match:
        raise ModelError(f"{text}: expected models:/NAME@alias or models:/NAME/VERSION")
    name, alias, version = match["name"], match["alias"], match["version"]
    client = _client()
    mv = _version_of(client, name, alias, version, text)
    dest = platform_home() / "model_cache" / name / str(mv.version)
    try:
        _sync_folder(mv.source, dest)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"{text}: cannot fetch version {mv.version} from {mv.source}: {exc}") from None
    if not (dest / "policy").is_dir():
        raise ModelError(f"{text}: version {mv.version} has no policy/ folder at {mv.source}")
    info = {"name": name, "version": str(mv.version), "alias": alias, "run_id": mv.run_id, "source": mv.source}
    (dest / "model_version.json").write_text(json.dumps(info, indent=2))
    return ResolvedModel(path=dest, uri=text, name=name, version=str(mv.version), alias=alias, run_id=mv.run_id)


def attach_artifacts(name: str, version: str, local_dir: str | Path, artifact_path: str) -> None:
    """Adds `local_dir` as `model/<artifact_path>` of that version (e.g. 'onnx', 'tensorrt/h100__trt10.12')."""
    client = _client()
    mv = _version_of(client, name, None, str(version), f"models:/{name}/{version}")
    if not mv.run_id:
        raise ModelError(f"models:/{name}/{version}: version has no source run to attach artifacts to")
    client.log_artifacts(mv.run_id, str(local_dir), f"{MODEL_ARTIFACT_PATH}/{artifact_path.strip('/')}")


def set_alias(name: str, alias: str, version: str) -> None:
    """Points `models:/name@alias` at `version` (moving it if it pointed elsewhere)."""
    _client().set_registered_model_alias(name, alias, str(version))


def get_version_by_alias(name: str, alias: str) -> str | None:
    """The version behind `models:/name@alias`, or None when the model or the alias does not exist."""
    client = _client()
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except Exception as exc:
        if _not_found(exc) or "alias" in str(exc).lower():
            return None
        raise


def set_version_tags(name: str, version: str, tags: dict) -> None:
    """Sets tags on a model version (values stringified)."""
    client = _client()
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, str(value))


def get_version_tags(name: str, version: str) -> dict[str, str]:
    """A model version's tags."""
    return dict(_client().get_model_version(name, str(version)).tags)


def log_version_metrics(name: str, version: str, metrics: dict[str, float], step: int = 0) -> None:
    """Evaluation results on a version: tags `metric.<key>` (shown in the registry UI) + source-run metrics."""
    client = _client()
    mv = client.get_model_version(name, str(version))
    for key, value in metrics.items():
        client.set_model_version_tag(name, str(version), f"metric.{key}", f"{float(value):.6g}")
        if mv.run_id:
            client.log_metric(mv.run_id, key, float(value), step=step)


def get_version_metrics(name: str, version: str) -> dict[str, float]:
    """A version's evaluation metrics, from its `metric.<key>` tags (see `log_version_metrics`)."""
    return {
        k.removeprefix("metric."): float(v)
        for k, v in get_version_tags(name, version).items()
        if k.startswith("metric.")
    }
