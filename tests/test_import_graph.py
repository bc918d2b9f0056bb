"""The package's import graph (every import, at any depth) keeps to the layers of design.md."""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("import_graph", ROOT / "scripts" / "import_graph.py")
import_graph = importlib.util.module_from_spec(spec)
sys.modules["import_graph"] = import_graph
spec.loader.exec_module(import_graph)


def test_the_package_has_no_import_cycles():
    assert import_graph.cycles(import_graph.read_graph()) == []


def test_no_module_imports_a_higher_layer():
    upward = [f"{i.source}:{i.line} -> {i.target}" for i in import_graph.upward_imports(import_graph.read_graph())]
    assert upward == []


def test_every_package_module_has_a_layer():
    graph = import_graph.read_graph()
    assert [m for m in graph.modules if import_graph.layer_of(m) is None] == []


def test_the_checker_sees_cycles_and_upward_imports(tmp_path):
    package = tmp_path / "mobile_vla"
    (package / "sim").mkdir(parents=True)
    (package / "data").mkdir()
    (package / "__init__.py").write_text("")
    (package / "sim" / "__init__.py").write_text("")
    (package / "data" / "__init__.py").write_text("")
    (package / "sim" / "a.py").write_text("def f():\n    from mobile_vla.sim import b\n")
    (package / "sim" / "b.py").write_text("from mobile_vla.sim.a import f\n")
    (package / "data" / "c.py").write_text("def g():\n    from mobile_vla.sim.a import f\n")
    graph = import_graph.read_graph(tmp_path)
    assert import_graph.cycles(graph) == [["mobile_vla.sim.a", "mobile_vla.sim.b"]]
    assert [(i.source, i.target, i.local) for i in import_graph.upward_imports(graph)] == [
        ("mobile_vla.data.c", "mobile_vla.sim.a", True)
    ]


def test_the_cli_help_imports_no_heavy_library():
    code = "import sys; from mobile_vla.cli import build_parser; build_parser(); print(sorted(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = set(eval(out))
    assert loaded.isdisjoint({"torch", "ray", "mlflow", "onnxruntime", "transformers", "miniworld"})


def test_the_serve_application_imports_no_exporter():
    # `serve run`/`serve deploy` import the app on the driver, and Ray imports the deployment classes in
    # every replica: the exporter (torch, transformers, open_clip) loads only where an engine is built.
    code = "import sys; import mobile_vla.serve.app; print(sorted(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = set(eval(out))
    assert loaded.isdisjoint({"torch", "transformers", "open_clip", "mobile_vla.export.onnx_export"})
