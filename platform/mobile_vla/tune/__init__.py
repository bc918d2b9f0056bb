"""Ray Tune sweeps over training runs (ASHA + Optuna, MLflow parent/child runs) and ensemble building.

    mobile-vla tune --config jobs/configs/tune_small.yaml
    mobile-vla ensemble --from-sweep NAME --members 3

Light at import: Ray, MLflow and torch load inside the functions that need them.
"""
