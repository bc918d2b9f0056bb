"""Data files: episode files, dataset manifests, and the importers and exporters of other formats.

Import the submodules directly (`from mobile_vla.data.episodes import read_episode`): this package
imports nothing heavy at start, so `mobile-vla --help` stays fast. The MiniWorld generator lives in
`mobile_vla.sim`, training windows in `mobile_vla.train`.
"""
