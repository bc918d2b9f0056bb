"""Ray Tune sweeps over training runs (ASHA + Optuna, MLflow parent/child runs) and ensemble building.

    mobile-vla tune --config jobs/configs/tune_small.yaml
    mobile-vla ensemble --from-sweep NAME --members 3

The package face is empty: `import mobile_vla.tune` loads nothing. Its modules import Ray, MLflow and
torch at the top; `commands.py` loads them inside its run functions (fast --help).

    sweep             run_sweep: the whole sweep
    sweep_config      TuneJobConfig (search space, ASHA, search algorithm, ensemble)
    trial_driver      the Tune trainable: one Ray Train run per trial
    trial_resources   what a trial holds, how many run at once
    placement_cleanup freeing the workers of trials that ended early
    search            scheduler and search algorithm
    progress          the sweep's progress bar
    sweep_tracking    parent run, trial outcomes, summary, registration of the best checkpoint
    trials            TrialSummary, SweepResult, the MLflow tags
    ensemble_build    members -> one registered EnsemblePolicy
"""
