"""`mobile-vla demo`: the whole loop on embedded defaults (local Ray, SQLite MLflow, MiniWorld).

    from mobile_vla.demo.settings import small
    from mobile_vla.demo.runner import run_demo
    summary = run_demo(small(home="./.mobile_vla/demo"))

Light at import (the CLI imports this package); Ray, torch, MLflow and MiniWorld load on use.
"""
