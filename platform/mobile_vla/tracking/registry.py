"""Model versions in the MLflow registry: register, resolve `models:/` URIs, attach artifacts, aliases.

A model version's source is a run-artifact folder `model/` laid out as

    model/
      policy/                         save_policy(): config.json, model.safetensors, preprocessing/
      onnx/                           export: model.onnx, model.fp16.onnx, text_encoder.onnx, signature.json
      tensorrt/<gpu>__trt<ver>/       export --tensorrt: model.plan (one per GPU model and TensorRT version)

Export and engine builds add to that same folder, so everything about a version stays in one place.
`resolve_model()` mirrors it into a local cache (`$MOBILE_VLA_HOME/model_cache/NAME/VERSION`), fetching
only what the cache lacks, so serving replicas and evaluation never re-download a whole model.

The cache is checked, and it carries a model through a registry outage:

- every file fetched from the registry has its SHA-256 and size recorded at download
  (`VERSION/cache_manifest.json`) and checked on every resolve; a corrupt or missing file is
  fetched again while the registry answers, and refused (ModelError naming the file) while it does not.
  A file whose size, mtime and ctime are those recorded with its hash is not hashed again (a write,
  even one that restores the mtime, changes the ctime), unless it was modified within
  `_RACY_WINDOW_NS` of the recording (a write in the same clock tick could leave the stat unchanged);
  so a replica start does not re-read gigabytes of weights;
- where an alias pointed when this node last asked is recorded next to the versions
  (`model_cache/NAME/aliases.json`);
- when the registry is unreachable (`RegistryUnreachable`: a connection error, a timeout, a
  server error, never a "no such version/alias" answer) `resolve_model` answers from the cache,
  an alias by its recorded version, and says so (`ResolvedModel.from_cache`, a warning). Files
  without a recorded checksum are never served that way.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from mobile_vla.config import platform_home
from mobile_vla.errors import ModelError
from mobile_vla.tracking.audit import set_alias
from mobile_vla.tracking.model_card import NOTE_TAG, refresh_model_card
from mobile_vla.tracking.store import mlflow_client

DEFAULT_MODEL_NAME = "mobile-vla-policy"
# The registered model's aliases: serving follows CHAMPION, which only the promotion gate (or a person)
# moves; training, sweeps and online updates register their result as CHALLENGER.
CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS_CHAMPION = "previous-champion"  # kept for a one-line rollback: promote --from-alias previous-champion --force
MODEL_ARTIFACT_PATH = "model"
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?$")
CACHE_MANIFEST = "cache_manifest.json"  # in a version's cache folder: {path: {"sha256", "bytes", "stat"}}
ALIAS_RECORD = "aliases.json"  # in a model's cache folder: {alias: {"version", "recorded_at"}}
_NOT_REGISTRY_FILES = {CACHE_MANIFEST, "model_version.json"}  # what the cache writes itself
_ADOPTED_PREFIXES = ("policy/", "onnx/")  # registry-only files; a cache older than its manifest gets them recorded
_HASH_CHUNK = 1 << 20
_RACY_WINDOW_NS = 2_000_000_000  # a file modified this close before its hash was recorded is always re-hashed

log = logging.getLogger(__name__)


class RegistryUnreachable(ModelError):
    """The registry did not answer (connection refused, timeout, server error) and the cache could not stand in."""


@dataclass(frozen=True)
class ResolvedModel:
    """A `models:/` URI (or folder) resolved to a local folder, with the version it names."""

    path: Path  # local folder with policy/ (and onnx/, tensorrt/ once exported)
    uri: str
    name: str | None = None
    version: str | None = None
    alias: str | None = None
    run_id: str | None = None
    from_cache: bool = False  # the registry was unreachable: served from the verified local copy

    def to_dict(self) -> dict:
        return {**asdict(self), "path": str(self.path)}


def _client():
    return mlflow_client()


def _not_found(exc: Exception) -> bool:
    """The registry answered "no such model, version or alias" (never a connection error, whose message
    names the alias endpoint's URL).
    """
    code = str(getattr(exc, "error_code", ""))
    return "RESOURCE_DOES_NOT_EXIST" in code or ("INVALID_PARAMETER_VALUE" in code and "not found" in str(exc).lower())


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


def register_policy(
    model_dir: str | Path,
    run_id: str,
    name: str = DEFAULT_MODEL_NAME,
    alias: str | None = CHALLENGER,
    tags: dict[str, str] | None = None,
    description: str | None = None,
    actor: str = "register",
) -> str:
    """Logs `model_dir` (holding `policy/`) under the run and registers it as a new version; `alias`
    moves to it (recorded in the audit with `actor`, see `mobile_vla.tracking.audit`).
    """
    model_dir = Path(model_dir)
    if not (model_dir / "policy").is_dir():
        raise ModelError(f"{model_dir}: no policy/ folder to register (expected save_policy output)")
    client = _client()
    client.log_artifacts(run_id, str(model_dir), MODEL_ARTIFACT_PATH)
    _log_pyfunc_flavor(client, run_id, model_dir)
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{MODEL_ARTIFACT_PATH}"
    try:
        client.create_registered_model(name, description="Mobile VLA policy (Kosmos-2 + CLIP + LSTM)")
    except Exception as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(getattr(exc, "error_code", exc)) and "already exists" not in str(exc):
            raise
    tags = {k: str(v) for k, v in (tags or {}).items()} | ({NOTE_TAG: description[:4900]} if description else {})
    version = client.create_model_version(name, source, run_id=run_id, tags=tags, description=description).version
    if alias:
        set_alias(name, alias, version, actor=actor, reason=f"version {version} registered from run {run_id}")
    refresh_model_card(name, str(version), champion_alias=CHAMPION)  # the description becomes the model card
    return str(version)


def _log_pyfunc_flavor(client, run_id: str, model_dir: Path) -> None:
    """`MLmodel` + input example beside policy/ (tracking/pyfunc_flavor.py): the version loads with
    `mlflow.pyfunc.load_model`. A policy folder without saved preprocessing gets none (a warning).
    """
    # Deferred: pyfunc_flavor imports MLflow and pandas, and the CLI's --help imports this module.
    from mobile_vla.tracking.pyfunc_flavor import log_pyfunc_files

    try:
        log_pyfunc_files(client, run_id, model_dir, MODEL_ARTIFACT_PATH)
    except ValueError as exc:
        log.warning("run %s: registered without the MLflow pyfunc flavor: %s", run_id, exc)


def _version_of(client, name: str, alias: str | None, version: str | None, uri: str):
    try:
        if alias:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)
    except Exception as exc:
        if _not_found(exc):
            what = f"alias '{alias}'" if alias else f"version {version}"
            raise ModelError(f"{uri}: registered model '{name}' has no {what}") from None
        raise RegistryUnreachable(f"{uri}: the model registry did not answer: {_first_line(exc)}") from exc


def _sync_folder(source: str, dest: Path) -> list[str]:
    """Downloads the entries (two levels deep) of an artifact folder that `dest` lacks; returns them."""
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

    missing_entries = missing("", 1)
    for rel in missing_entries:
        with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
            got = Path(download_artifacts(artifact_uri=f"{source}/{rel}", dst_path=tmp))
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():  # another process may have fetched it meanwhile
                shutil.move(str(got), str(target))
    return missing_entries


def _read_json(path: Path) -> dict | None:
    """The JSON object in `path`: {} when the file does not exist, None when it cannot be read as one."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, data: dict) -> None:
    """Writes `data` to `path` in one rename: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock on `path` among the processes of this node (replicas of one node share a cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def _files_under(folder: Path, rel: str) -> list[str]:
    """Relative paths of the files at or under `folder / rel` ("" for all), the cache's own files left out."""
    root = folder / rel if rel else folder
    paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    out = [p.relative_to(folder).as_posix() for p in paths]
    return [r for r in out if r not in _NOT_REGISTRY_FILES and not r.rsplit("/", 1)[-1].startswith(".")]


def _stat_record(stat: os.stat_result, recorded_ns: int) -> dict:
    return {"mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns, "recorded_ns": recorded_ns}


def _unchanged_since_hashed(stat: os.stat_result, entry: dict) -> bool:
    """True when the file's stat is the one recorded with its hash, and that record is not racy."""
    record = entry.get("stat")
    if not isinstance(record, dict):
        return False
    return (
        record.get("mtime_ns") == stat.st_mtime_ns
        and record.get("ctime_ns") == stat.st_ctime_ns
        and isinstance(record.get("recorded_ns"), int)
        and record["recorded_ns"] - stat.st_mtime_ns > _RACY_WINDOW_NS
    )


def cache_problems(folder: str | Path) -> list[str]:
    """Files of a cached version that are gone or whose size or SHA-256 differ from the ones recorded at
    download (a file whose stat is unchanged since it was hashed is not read again: module doc).
    """
    return _check_cache(Path(folder))[0]


def _check_cache(folder: Path) -> tuple[list[str], dict | None]:
    """(the files that fail their check, the manifest with fresh stat records where a file was hashed,
    found good and is no longer racy: None when nothing changed).
    """
    manifest = _read_json(folder / CACHE_MANIFEST)
    if manifest is None:
        return [CACHE_MANIFEST], None
    bad, changed = [], False
    for rel, entry in sorted(manifest.items()):
        path = folder / rel
        try:
            stat = path.stat()
            if stat.st_size != entry["bytes"]:
                bad.append(rel)
            elif _unchanged_since_hashed(stat, entry):
                continue
            elif _digest(path) != entry["sha256"]:
                bad.append(rel)
            elif (now := time.time_ns()) - stat.st_mtime_ns > _RACY_WINDOW_NS and _same_stat(path.stat(), stat):
                entry["stat"] = _stat_record(stat, now)
                changed = True
        except (OSError, KeyError, TypeError, AttributeError):
            bad.append(rel)
    return bad, manifest if changed else None


def _same_stat(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_size, a.st_mtime_ns, a.st_ctime_ns) == (b.st_size, b.st_mtime_ns, b.st_ctime_ns)


def _drop_corrupt(dest: Path, uri: str) -> None:
    """Deletes what failed its checksum (the whole download entry holding it), so the sync fetches it
    again; when all is good, records the stat of the files just hashed (the next resolve skips them).
    """
    bad, refreshed = _check_cache(dest)
    if not bad:
        if refreshed is not None:
            _write_json(dest / CACHE_MANIFEST, refreshed)
        return
    log.warning("%s: cached files failed their checksum, fetching them again: %s", uri, ", ".join(bad[:5]))
    if CACHE_MANIFEST in bad:  # no record left to trust: fetch the whole version again
        shutil.rmtree(dest, ignore_errors=True)
        return
    manifest = _read_json(dest / CACHE_MANIFEST) or {}
    for entry in sorted({"/".join(rel.split("/")[:2]) for rel in bad}):  # what _sync_folder fetches as one
        target = dest / entry
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
        manifest = {rel: v for rel, v in manifest.items() if rel != entry and not rel.startswith(f"{entry}/")}
    _write_json(dest / CACHE_MANIFEST, manifest)


def _record_checksums(dest: Path, fetched: list[str]) -> None:
    """Records size and SHA-256 of the files just fetched (and of registry-only files a cache older
    than its manifest holds), so every later resolve can check them.
    """
    manifest = _read_json(dest / CACHE_MANIFEST) or {}
    new = {rel for entry in fetched for rel in _files_under(dest, entry)}
    new |= {rel for rel in _files_under(dest, "") if rel.startswith(_ADOPTED_PREFIXES) and rel not in manifest}
    if not new:
        return
    for rel in sorted(new):
        path = dest / rel
        stat = path.stat()  # before reading: a write during the hash changes the ctime and forces a re-hash
        manifest[rel] = {"sha256": _digest(path), "bytes": stat.st_size, "stat": _stat_record(stat, time.time_ns())}
    _write_json(dest / CACHE_MANIFEST, manifest)


def _alias_record(name: str) -> Path:
    return platform_home() / "model_cache" / name / ALIAS_RECORD


def remember_alias(name: str, alias: str, version: str) -> None:
    """Records next to the cache that `models:/name@alias` pointed at `version` (written only on a change)."""
    path = _alias_record(name)
    if ((_read_json(path) or {}).get(alias) or {}).get("version") == str(version):
        return
    with file_lock(path):
        record = _read_json(path) or {}
        record[alias] = {"version": str(version), "recorded_at": datetime.now(UTC).isoformat(timespec="seconds")}
        _write_json(path, record)


def remembered_alias_version(name: str, alias: str) -> str | None:
    """The version `models:/name@alias` pointed at when this node last asked the registry (None: never asked)."""
    entry = (_read_json(_alias_record(name)) or {}).get(alias)
    return str(entry["version"]) if isinstance(entry, dict) and entry.get("version") else None


def _from_cache(uri: str, name: str, version: str, alias: str | None, why: str) -> ResolvedModel:
    """The cached copy of `version`, verified, when the registry cannot give it (`why`)."""
    dest = platform_home() / "model_cache" / name / version
    if not (dest / "policy").is_dir():
        raise RegistryUnreachable(f"{why}; no cached copy of version {version} at {dest} either")
    with file_lock(dest):
        manifest = _read_json(dest / CACHE_MANIFEST)
        bad = cache_problems(dest) if manifest else []
    if not manifest:
        raise RegistryUnreachable(
            f"{why}; the cached copy of version {version} at {dest} has no recorded checksums, so it is not "
            "served unverified (resolve it once with the registry reachable)"
        )
    if bad:
        raise ModelError(
            f"{uri}: the cached copy of version {version} at {dest} is corrupt ({', '.join(bad[:5])} differ from "
            f"the checksums recorded at download) and cannot be fetched again ({why}): refusing to serve it. "
            f"Delete {dest} and resolve it with the registry reachable"
        )
    info = _read_json(dest / "model_version.json") or {}
    log.warning("%s: serving version %s from the local cache %s: %s", uri, version, dest, why)
    return ResolvedModel(
        path=dest, uri=uri, name=name, version=version, alias=alias, run_id=info.get("run_id"), from_cache=True
    )


def resolve_model(uri: str | Path) -> ResolvedModel:
    """`models:/NAME@alias`, `models:/NAME/V` or a local folder -> a local folder with the model.

    A registered version is fetched into the checked local cache (see the module doc); while the
    registry is unreachable the verified cached copy answers (`from_cache` True), an alias by the
    version it pointed at when this node last asked.

    Raises:
        ModelError: a bad URI, no such version or alias, a version without policy/, a corrupt cached
            copy that cannot be fetched again; `RegistryUnreachable` when neither the registry nor
            the cache can give the model.
    """
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
    try:
        mv = _version_of(_client(), name, alias, version, text)
    except RegistryUnreachable as exc:
        version = version or remembered_alias_version(name, alias)
        if version is None:
            why = f"{exc}; this node never resolved alias '{alias}', so no cached version stands in"
            raise RegistryUnreachable(why) from exc
        return _from_cache(text, name, version, alias, str(exc))
    dest = platform_home() / "model_cache" / name / str(mv.version)
    fetch_error = None
    with file_lock(dest):
        _drop_corrupt(dest, text)
        try:
            fetched = _sync_folder(mv.source, dest)
        except ModelError:
            raise
        except Exception as exc:
            fetch_error = f"{text}: cannot fetch version {mv.version} from {mv.source}: {_first_line(exc)}"
        else:
            _record_checksums(dest, fetched)
    if (
        fetch_error is not None
    ):  # the artifact store failed while the registry answered: a complete cached copy still serves
        if (dest / "policy").is_dir() and _read_json(dest / CACHE_MANIFEST):
            return _from_cache(text, name, str(mv.version), alias, fetch_error)
        raise ModelError(fetch_error)
    if not (dest / "policy").is_dir():
        raise ModelError(f"{text}: version {mv.version} has no policy/ folder at {mv.source}")
    info = {"name": name, "version": str(mv.version), "alias": alias, "run_id": mv.run_id, "source": mv.source}
    _write_json(dest / "model_version.json", info)
    if alias:
        remember_alias(name, alias, str(mv.version))
    return ResolvedModel(path=dest, uri=text, name=name, version=str(mv.version), alias=alias, run_id=mv.run_id)


def attach_artifacts(name: str, version: str, local_dir: str | Path, artifact_path: str) -> None:
    """Adds `local_dir` as `model/<artifact_path>` of that version (e.g. 'onnx', 'tensorrt/h100__trt10.12')."""
    client = _client()
    mv = _version_of(client, name, None, str(version), f"models:/{name}/{version}")
    if not mv.run_id:
        raise ModelError(f"models:/{name}/{version}: version has no source run to attach artifacts to")
    client.log_artifacts(mv.run_id, str(local_dir), f"{MODEL_ARTIFACT_PATH}/{artifact_path.strip('/')}")


def get_version_by_alias(name: str, alias: str) -> str | None:
    """The version behind `models:/name@alias`, or None when the model or the alias does not exist.

    The answer is recorded next to the model cache (`remembered_alias_version`).

    Raises:
        RegistryUnreachable: the registry did not answer.
    """
    client = _client()
    try:
        version = str(client.get_model_version_by_alias(name, alias).version)
    except Exception as exc:
        if _not_found(exc):
            return None
        raise RegistryUnreachable(
            f"models:/{name}@{alias}: the model registry did not answer: {_first_line(exc)}"
        ) from exc
    remember_alias(name, alias, version)
    return version


def set_version_tags(name: str, version: str, tags: dict) -> None:
    """Sets tags on a model version (values stringified)."""
    client = _client()
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, str(value))


def get_version_tags(name: str, version: str) -> dict[str, str]:
    """A model version's tags."""
    return dict(_client().get_model_version(name, str(version)).tags)


def log_version_metrics(
    name: str, version: str, metrics: dict[str, float], step: int = 0, refresh_card: bool = True
) -> None:
    """Evaluation results on a version: tags `metric.<key>` (shown in the registry UI) + source-run metrics;
    the version's model card is rewritten (`refresh_card` False: the caller rewrites it after more results).
    """
    client = _client()
    mv = client.get_model_version(name, str(version))
    for key, value in metrics.items():
        client.set_model_version_tag(name, str(version), f"metric.{key}", f"{float(value):.6g}")
        if mv.run_id:
            client.log_metric(mv.run_id, key, float(value), step=step)
    if refresh_card:
        refresh_model_card(name, str(version), champion_alias=CHAMPION)


def get_version_metrics(name: str, version: str) -> dict[str, float]:
    """A version's evaluation metrics, from its `metric.<key>` tags (see `log_version_metrics`)."""
    return {
        k.removeprefix("metric."): float(v)
        for k, v in get_version_tags(name, version).items()
        if k.startswith("metric.")
    }
