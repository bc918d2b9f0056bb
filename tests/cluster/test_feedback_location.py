"""On the cluster, the feedback serving acknowledges lands where `online-update` reads it: one folder on
the shared storage, defined once (the nodes' MOBILE_VLA_FEEDBACK_DIR in clusters/gpu.yaml), resolved
the same way by the Serve app (serve_configs/gpu.yaml) and by the update job (jobs/configs/online_update.yaml).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

from mobile_vla.online.feedback_store import FEEDBACK_DIR_ENV, feedback_root
from mobile_vla.online.update import load_update_config
from mobile_vla.serve import app as serve_app
from mobile_vla.serve.settings import ServeAppConfig

REPO = Path(__file__).resolve().parents[2]


def node_environment(cluster: dict) -> dict[str, str]:
    """The variables every node's ~/.mobile_vla_env exports (what `ray start`, so every Ray worker and
    job driver, inherits): the quoted `export NAME=value` lines of setup_commands.
    """
    commands = " ".join(str(c) for c in cluster["setup_commands"])
    env = {}
    for quoted in re.findall(r"""'export [A-Z_]+=[^']*'|"export [A-Z_]+=[^"]*\"""", commands):
        name, value = shlex.split(quoted)[0].removeprefix("export ").split("=", 1)
        env[name] = value
    return env


def shared_mounts(cluster: dict) -> list[str]:
    """Container paths bind-mounted from the host's shared file system (`-v /shared:/shared`)."""
    mounts = [opt.split()[1].split(":")[1] for opt in cluster["docker"]["run_options"] if opt.startswith("-v ")]
    nfs = " ".join(cluster["initialization_commands"])
    return [m for m in mounts if re.search(rf"mount -t nfs4 .* {re.escape(m)}\b", nfs)]


def resolved_under(monkeypatch, env: dict[str, str], resolve) -> Path:
    for name in (FEEDBACK_DIR_ENV, "MOBILE_VLA_HOME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return resolve()


def test_serving_and_the_online_update_agree_on_the_shared_feedback_folder(monkeypatch):
    cluster = yaml.safe_load((REPO / "clusters" / "gpu.yaml").read_text())
    serve = yaml.safe_load((REPO / "serve_configs" / "gpu.yaml").read_text())
    (application,) = serve["applications"]
    nodes = node_environment(cluster)
    assert FEEDBACK_DIR_ENV in nodes, f"clusters/gpu.yaml must export {FEEDBACK_DIR_ENV} on every node"
    serve_env = {**nodes, **application.get("runtime_env", {}).get("env_vars", {})}  # the app's vars win
    args = ServeAppConfig.model_validate(application["args"])

    # What build_app gives the ingress (the same function: serve/app.py resolves feedback_dir with it).
    assert serve_app.feedback_root is feedback_root
    served = resolved_under(monkeypatch, serve_env, lambda: feedback_root(args.feedback_dir))
    # What `ray job submit ... jobs/online_update.py --config jobs/configs/online_update.yaml` reads.
    update = load_update_config(REPO / "jobs" / "configs" / "online_update.yaml")
    updated = resolved_under(monkeypatch, nodes, update.feedback_root)

    assert served == updated, f"serving writes {served}, the online update reads {updated}"
    mounts = shared_mounts(cluster)
    assert any(served.is_relative_to(m) for m in mounts), f"{served} is not on the shared storage {mounts}"
    # Defined once: neither the Serve config nor the job config names the folder again.
    assert args.feedback_dir is None and FEEDBACK_DIR_ENV not in application.get("runtime_env", {}).get("env_vars", {})
    assert update.feedback.root is None


def test_feedback_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("MOBILE_VLA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(FEEDBACK_DIR_ENV, raising=False)
    assert feedback_root() == tmp_path / "home" / "feedback"
    monkeypatch.setenv(FEEDBACK_DIR_ENV, str(tmp_path / "shared" / "feedback"))
    assert feedback_root() == tmp_path / "shared" / "feedback"
    assert feedback_root(tmp_path / "explicit") == tmp_path / "explicit"
