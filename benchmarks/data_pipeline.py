"""Data benchmark: bytes per stored frame, and windows/s through the Ray Data pipeline with augmentation.

    .venv/bin/python benchmarks/data_pipeline.py                      # MiniWorld episodes made here
    .venv/bin/python benchmarks/data_pipeline.py --data data/nav      # an existing dataset folder
    .venv/bin/python benchmarks/data_pipeline.py --synthetic          # no simulator: flat-shaded frames

Writes benchmarks/results/data_pipeline.json. Stored size depends on frame content (rendered scenes
compress far better than camera noise), so the JSON says which frames were measured. Throughput
is for this machine's CPUs (`cpu_count` in the JSON): the pipeline scales with the CPUs Ray has.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

RAW_FRAME_BYTES = 224 * 224 * 3


def synthetic_dataset(folder: Path, episodes: int, frames: int) -> None:
    """Flat-shaded rooms (floor, wall, a few boxes) with sensor noise: a stand-in for rendered frames."""
    from mobile_vla.data.episodes import SCHEMA_VERSION, Episode, write_episode
    from mobile_vla.data.manifest import build_manifest

    rng = np.random.default_rng(0)
    names = []
    for e in range(episodes):
        wall, floor = rng.integers(60, 200, 3), rng.integers(60, 200, 3)
        boxes = [(rng.integers(0, 180), rng.integers(0, 180), rng.integers(0, 256, 3)) for _ in range(3)]
        images = np.empty((frames, 224, 224, 3), np.uint8)
        for t in range(frames):
            frame = np.empty((224, 224, 3), np.int16)
            horizon = 100 + t % 20
            frame[:horizon], frame[horizon:] = wall, floor
            for x, y, colour in boxes:
                x = int((x + 2 * t) % 190)
                frame[y : y + 34, x : x + 34] = colour
            frame += rng.integers(-3, 4, frame.shape, dtype=np.int16)
            images[t] = np.clip(frame, 0, 255)
        actions = rng.uniform(-0.5, 0.5, (frames, 3)).astype(np.float32)
        state = np.vstack([np.zeros((1, 3), np.float32), actions[:-1]])
        name = f"synthetic_{e:04d}.h5"
        write_episode(
            folder / name,
            Episode(
                images,
                actions,
                state,
                {
                    "instruction": ["go to the red box", "go to the blue ball avoiding the box on the left"][e % 2],
                    "episode_id": name,
                    "source": "synthetic",
                    "success": True,
                    "control_hz": 5.0,
                    "schema_version": SCHEMA_VERSION,
                },
            ),
        )
        names.append(name)
    build_manifest(folder, {"train": names}, {"kind": "synthetic", "episodes": episodes, "frames": frames})


def storage(folder: Path, names: list[str]) -> dict:
    """Bytes per frame as stored, and what lzf/gzip levels would give for the same frames."""
    import h5py

    from mobile_vla.data.episodes import read_episode, write_episode

    stored, frames, files = 0, 0, 0
    for name in names:
        with h5py.File(folder / name) as f:
            stored += f["images"].id.get_storage_size()
            frames += f["images"].shape[0]
            compression = f"{f['images'].compression}-{f['images'].compression_opts}"
        files += (folder / name).stat().st_size
    alternatives = {}
    sample = names[: max(1, min(4, len(names)))]
    with tempfile.TemporaryDirectory() as tmp:
        for label, options in {
            "lzf": {"compression": "lzf"},
            "gzip-1": {"compression_level": 1},
            "gzip-4": {"compression_level": 4},
            "gzip-9": {"compression_level": 9},
        }.items():
            size, count, start = 0, 0, time.perf_counter()
            for name in sample:
                episode = read_episode(folder / name)
                path = write_episode(Path(tmp) / name, episode, **options)
                with h5py.File(path) as f:
                    size += f["images"].id.get_storage_size()
                count += episode.num_frames
            write_s = time.perf_counter() - start
            reader_start = time.perf_counter()
            for name in sample:
                read_episode(Path(tmp) / name)
            alternatives[label] = {
                "bytes_per_frame": round(size / count),
                "ratio_vs_raw": round(RAW_FRAME_BYTES * count / size, 2),
                "read_frames_per_s": round(count / (time.perf_counter() - reader_start)),
                "write_frames_per_s": round(count / write_s),
            }
    return {
        "stored_compression": compression,
        "image_bytes_per_frame": round(stored / frames),
        "file_bytes_per_frame": round(files / frames),
        "raw_bytes_per_frame": RAW_FRAME_BYTES,
        "frames": frames,
        "alternatives_on_sample": alternatives,
    }


def ray_windows_per_s(folder: Path, preprocessing, passes: int, batch_size: int) -> dict:
    from mobile_vla.train.pipeline import build_window_dataset

    ds = build_window_dataset(folder, "train", preprocessing, augment=True, seed=None, shuffle=True)
    timings = []
    for _ in range(passes):
        start, windows = time.perf_counter(), 0
        for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
            windows += len(batch["window_id"])
        timings.append((windows, time.perf_counter() - start))
    steady = timings[1:] or timings
    return {
        "windows_per_pass": timings[0][0],
        "first_pass_windows_per_s": round(timings[0][0] / timings[0][1], 1),
        "steady_windows_per_s": round(sum(w for w, _ in steady) / sum(s for _, s in steady), 1),
        "passes": passes,
        "batch_size": batch_size,
        "augment": True,
    }


def torch_windows_per_s(folder: Path, preprocessing, limit: int) -> dict:
    from mobile_vla.train.windows import WindowDataset

    ds = WindowDataset(folder, "train", preprocessing, augment=True, seed=0)
    count = min(limit, len(ds))
    start = time.perf_counter()
    for i in range(count):
        ds[i]
    return {
        "windows": count,
        "windows_per_s": round(count / (time.perf_counter() - start), 1),
        "process": "single, no DataLoader workers",
        "augment": True,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="existing dataset folder (default: make one)")
    parser.add_argument("--synthetic", action="store_true", help="flat-shaded synthetic frames instead of MiniWorld")
    parser.add_argument("--episodes", type=int, default=12)
    parser.add_argument("--frames", type=int, default=40, help="frames per synthetic episode")
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--passes", type=int, default=3, help="passes through the Ray dataset (first = warm-up)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/data_pipeline.json"))
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("PYOPENGL_PLATFORM", "egl")

    import ray

    from mobile_vla.data.manifest import load_manifest
    from mobile_vla.policy import presets
    from mobile_vla.policy.preprocessing import Preprocessing
    from mobile_vla.policy.text import build_tokenizer

    ray.init(include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    with tempfile.TemporaryDirectory() as tmp:
        folder, source = args.data, "given"
        if folder is None:
            folder = Path(tmp) / "data"
            if args.synthetic:
                folder.mkdir()
                synthetic_dataset(folder, args.episodes, args.frames)
                source = "synthetic flat-shaded frames"
            else:
                from mobile_vla.sim.generate import generate_dataset

                generate_dataset(folder, args.episodes, seed=0, progress=False)
                source = "MiniWorld (mobile-vla data generate)"
        manifest = load_manifest(folder)
        names = [n for split in manifest["splits"].values() for n in split]
        preprocessing = Preprocessing.from_manifest(
            manifest, build_tokenizer(presets.tiny()), window=args.window, chunk=args.chunk
        )
        result = {
            "benchmark": "data_pipeline",
            "machine": {
                "cpu_count": os.cpu_count(),
                "platform": platform.platform(),
                "ray_cpus": ray.cluster_resources().get("CPU"),
            },
            "dataset": {
                "source": source,
                "episodes": len(names),
                "frames": manifest["counts"]["total"]["frames"],
                "window": args.window,
                "chunk": args.chunk,
            },
            "storage": storage(folder, names),
            "ray_data": ray_windows_per_s(folder, preprocessing, args.passes, args.batch_size),
            "torch_dataset": torch_windows_per_s(folder, preprocessing, limit=200),
        }
    ray.shutdown()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
