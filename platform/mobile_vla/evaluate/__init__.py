"""Evaluation: offline metrics on a dataset split and closed-loop MiniWorld runs next to the expert.

    from mobile_vla.evaluate.closed_loop import evaluate_closed_loop
    from mobile_vla.evaluate.offline import evaluate_offline

Light at import (the CLI imports this package): numpy only; Ray, torch and MiniWorld load on use.
"""
