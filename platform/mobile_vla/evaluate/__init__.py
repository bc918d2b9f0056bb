"""Evaluation: offline metrics on a dataset split and closed-loop MiniWorld runs next to the expert.

    from mobile_vla.evaluate.closed_loop import evaluate_closed_loop
    from mobile_vla.evaluate.offline import evaluate_offline

Light at import (the CLI imports this package): it imports nothing; Ray, torch, MLflow and
MiniWorld load with the submodules.
"""

EXPERT = "expert"  # the model name that means the scripted expert (`--model expert`)
