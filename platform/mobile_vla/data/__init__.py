"""Data stage: episode files, dataset manifests, the original-format importer, training windows and
the Ray Data pipeline, plus the MiniWorld generator.

Import the submodules directly (`from mobile_vla.data.episodes import read_episode`): this package
imports nothing heavy at start, so `mobile-vla --help` stays fast.
"""
