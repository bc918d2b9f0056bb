"""Benchmark data: the folder given with --data, or MiniWorld episodes generated once into the home."""

from __future__ import annotations

from pathlib import Path


def ensure_data(args, home: Path) -> Path:
    """`args.data` if set; else `<home>/bench_data_<episodes>`, generated unless a dataset is already there."""
    from mobile_vla.data.manifest import load_manifest

    if args.data:
        return Path(args.data).resolve()
    folder = home / f"bench_data_{args.episodes}"
    try:
        load_manifest(folder)
        return folder
    except Exception:
        pass
    from mobile_vla.sim.generate import generate_dataset
    from mobile_vla.sim.split_spec import default_split_spec

    print(f"generating {args.episodes} episodes into {folder} ...", flush=True)
    generate_dataset(folder, args.episodes, default_split_spec(), seed=0, progress=True)
    return folder
