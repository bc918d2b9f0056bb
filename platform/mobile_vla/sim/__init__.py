"""The simulator: MiniWorld scenes, the split spec, instructions, the scripted expert, the environment,
action execution, episode generation and the success statistics evaluation uses.

Import the submodules directly (`from mobile_vla.sim.scenes import scene_from_seed`): this package
imports nothing heavy at start (no GL, no MiniWorld), so `mobile-vla --help` stays fast.
"""
