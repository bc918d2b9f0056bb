"""`data merge`: one dataset folder holding the episodes of several (aggregated DAgger's union).

    manifest = merge_datasets("data/agg", ["data/nav"], train_only=["~/.mobile_vla/online_updates/<t>/feedback"])

Classic DAgger retrains on the union of the expert data and the expert-labelled states the policy
visited. Every episode of every source is symlinked (absolute path) or copied into the new folder
and keeps its source split, except the episodes of `train_only` sources, which all go to `train`:
the merged `val` split stays the clean one, so checkpoint selection stays comparable across rounds.
The sources' `generator.split_spec` (one at most) is carried over, so closed-loop evaluation of the
merged dataset holds out the same scenes as its generated source.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from mobile_vla.data.manifest import MANIFEST_NAME, build_manifest, load_manifest
from mobile_vla.errors import DataError

MERGED_KIND = "merged"


def _distinct_sources(sources: Sequence[str | Path], train_only: Sequence[str | Path]) -> list[tuple[Path, bool]]:
    """(absolute folder, train_only) for each source once, in order; train-only ones not in `sources` last."""
    train_only_paths = {Path(p).expanduser().resolve() for p in train_only}
    ordered: dict[Path, bool] = {}
    for path in [*sources, *train_only]:
        folder = Path(path).expanduser().resolve()
        ordered.setdefault(folder, folder in train_only_paths)
    return list(ordered.items())


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"--out {out}: exists and is not an empty folder; merge into a new folder")


def _one_value(manifests: dict[Path, dict], key: str) -> None:
    """DataError naming two sources that disagree on manifest `key` (control_hz, state_dim)."""
    seen: dict = {}
    for folder, manifest in manifests.items():
        seen.setdefault(manifest[key], folder)
    if len(seen) > 1:
        (first, first_folder), (second, second_folder) = list(seen.items())[:2]
        raise DataError(
            f"sources disagree on {key}: {first} in {first_folder}, {second} in {second_folder}; one dataset, one value"
        )


def _split_spec(manifests: dict[Path, dict]) -> dict | None:
    """The one `generator.split_spec` the sources carry (None when none does)."""
    spec, spec_folder = None, None
    for folder, manifest in manifests.items():
        candidate = (manifest.get("generator") or {}).get("split_spec")
        if not candidate:
            continue
        if spec is None:
            spec, spec_folder = candidate, folder
        elif candidate != spec:
            raise DataError(
                f"sources {spec_folder} and {folder} were generated with different split specs "
                "(generator.split_spec); merge datasets that hold out the same scenes"
            )
    return spec


def merge_datasets(
    out: str | Path,
    sources: Sequence[str | Path],
    train_only: Sequence[str | Path] = (),
    copy: bool = False,
    progress: bool = False,
) -> dict:
    """Writes a new dataset folder `out` with every episode of `sources` and `train_only` and its manifest.

    Args:
        out: a new (or empty) folder. It is built in a temporary folder beside it and renamed into
            place at the end, so a failed merge leaves nothing behind.
        sources: dataset folders (manifest.json + episode files); each episode keeps its split.
        train_only: dataset folders whose episodes all go to split `train` (DAgger's labelled
            states); added to `sources` when not listed there.
        copy: copy the episode files instead of symlinking them by absolute path.
        progress: show a progress bar while the manifest reads the episodes.

    Returns:
        The merged manifest (generator kind "merged", with each source's path, kind, episodes and
        train_only flag, and the sources' split spec).

    Raises:
        DataError: no sources, a source without manifest.json, the same episode file name in two
            sources, sources with different control_hz, state_dim or split specs, or a non-empty `out`.
    """
    out = Path(out).expanduser().absolute()
    folders = _distinct_sources(sources, train_only)
    if not folders:
        raise DataError("nothing to merge: name at least one source dataset folder")
    _check_out(out)
    manifests = {folder: load_manifest(folder) for folder, _ in folders}
    _one_value(manifests, "control_hz")
    _one_value(manifests, "state_dim")
    split_spec = _split_spec(manifests)

    splits: dict[str, list[str]] = {}
    origin: dict[str, Path] = {}  # episode file name -> source folder
    described = []
    for folder, only_train in folders:
        manifest = manifests[folder]
        count = 0
        for split, names in manifest["splits"].items():
            for name in names:
                if name in origin:
                    raise DataError(
                        f"episode file {name} is in both {origin[name]} and {folder}; "
                        "merged episodes must have distinct file names"
                    )
                origin[name] = folder
                splits.setdefault("train" if only_train else split, []).append(name)
                count += 1
        described.append(
            {
                "path": str(folder),
                "kind": (manifest.get("generator") or {}).get("kind"),
                "episodes": count,
                "train_only": only_train,
            }
        )
    if not origin:
        raise DataError(f"nothing to merge: no episodes listed in {', '.join(str(f) for f, _ in folders)}")
    if "train" in splits:  # train first: it is the split the statistics come from
        splits = {"train": splits.pop("train"), **splits}

    generator = {"kind": MERGED_KIND, "sources": described, "split_spec": split_spec}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.merge-{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a killed merge of this process id
    tmp.mkdir()
    try:
        for name, folder in origin.items():
            source_file = (folder / name).resolve()  # through any merged source's own links
            if not source_file.is_file():
                raise DataError(f"{folder / name}: listed in {folder / MANIFEST_NAME} but not found")
            if copy:
                shutil.copy2(source_file, tmp / name)
            else:
                (tmp / name).symlink_to(source_file)
        manifest = build_manifest(tmp, splits, generator=generator, progress=progress)
        _check_out(out)  # nothing appeared there meanwhile
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
