"""`mobile-vla export --model MODEL_URI [--fp16] [--tensorrt]`: graphs + parity + signature, attached to the version.

    mobile-vla export --model models:/mobile-vla-policy@challenger --fp16
    mobile-vla export --model models:/mobile-vla-policy/3 --tensorrt      # on a GPU node, per GPU model

The ONNX files go to the version's `onnx/` (the same MLflow model version they came from), a
TensorRT plan to `tensorrt/<gpu>__trt<version>/`. A version that already has verified ONNX graphs
keeps them (a plan is built from exactly those bytes) unless --force.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a model version to ONNX (fp32/fp16) and TensorRT, with parity checks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        required=True,
        metavar="MODEL_URI",
        help="models:/NAME@alias, models:/NAME/VERSION or a model folder (holding policy/)",
    )
    parser.add_argument(
        "--fp16", action="store_true", help="also write model.fp16.onnx (and an fp16 plan with --tensorrt)"
    )
    parser.add_argument(
        "--tensorrt", action="store_true", help="build a TensorRT plan for this GPU (needs a GPU and TensorRT)"
    )
    parser.add_argument(
        "--data",
        metavar="DIR",
        default=None,
        help="dataset folder whose frames the parity check uses (default: render MiniWorld frames)",
    )
    parser.add_argument(
        "--exporter",
        choices=("dynamo", "legacy"),
        default="dynamo",
        help="torch.onnx exporter (default dynamo; falls back to legacy if dynamo fails)",
    )
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    parser.add_argument("--max-batch", type=int, default=32, help="largest batch of the TensorRT profile (default 32)")
    parser.add_argument("--force", action="store_true", help="re-export ONNX even if the version already has it")
    parser.add_argument("--no-attach", action="store_true", help="write files locally only, do not attach to MLflow")
    parser.set_defaults(func=run_export)


def _existing_signature(folder, fp16: bool):
    """The version's current signature if every graph it names verifies (and fp16 exists when asked)."""
    from mobile_vla.errors import ModelError
    from mobile_vla.export.signature import load_signature, verify_graph_file

    try:
        signature = load_signature(folder / "onnx")
        for graph in signature.graphs.values():
            verify_graph_file(folder / "onnx", graph)
    except ModelError:
        return None
    if fp16 and "step_fp16" not in signature.graphs:
        return None
    return signature


def run_export(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from mobile_vla.errors import ConfigError
    from mobile_vla.tracking import resolve_model

    console = Console(stderr=True)
    if args.max_batch < 1:
        raise ConfigError(f"--max-batch = {args.max_batch}: expected >= 1")
    if args.tensorrt:  # say so before any work: nothing gets half-done on a machine without a GPU
        from mobile_vla.errors import ResourceError
        from mobile_vla.export.tensorrt_engine import require_cuda_gpu, require_tensorrt

        try:
            require_tensorrt()
            require_cuda_gpu()
        except ResourceError as exc:
            raise ResourceError(
                f"--tensorrt: {exc}; nothing was exported (run without --tensorrt for ONNX only)"
            ) from None

    resolved = resolve_model(args.model)
    folder = resolved.path
    attach = bool(resolved.name and resolved.version) and not args.no_attach
    signature = None if args.force else _existing_signature(folder, args.fp16)
    if signature is not None:
        console.print(
            f"[dim]{folder}/onnx already holds verified graphs (exported {signature.created_at}); "
            "keeping them (--force re-exports)[/dim]"
        )
    else:
        from mobile_vla.export.onnx_export import export_model

        with console.status("exporting") as status:
            result = export_model(
                folder,
                name=resolved.name,
                version=resolved.version,
                fp16=args.fp16,
                exporter=args.exporter,
                opset=args.opset,
                data_dir=args.data,
                progress=lambda text: status.update(text),
            )
        signature = result.signature
        for note in result.exporter_notes:
            console.print(f"[yellow]note:[/yellow] {note}")
        if attach:
            attach_onnx(resolved, signature)

    plan_folder = None
    if args.tensorrt:
        from mobile_vla.export.tensorrt_engine import TENSORRT_DIR, build_engine

        with console.status("building the TensorRT plan (minutes)"):
            plan_folder = build_engine(folder, signature, max_batch=args.max_batch, fp16=args.fp16)
        if attach:
            from mobile_vla.tracking import attach_artifacts, set_version_tags

            attach_artifacts(resolved.name, resolved.version, plan_folder, f"{TENSORRT_DIR}/{plan_folder.name}")
            set_version_tags(
                resolved.name,
                resolved.version,
                {f"export.tensorrt.{plan_folder.name}": "fp16" if args.fp16 else "fp32"},
            )

    table = Table(title=f"export of {resolved.uri}", show_header=True)
    table.add_column("file")
    table.add_column("precision")
    table.add_column("MB", justify="right")
    for graph in signature.graphs.values():
        table.add_row(f"onnx/{graph.file}", graph.precision, f"{graph.bytes / 1e6:.1f}")
    if plan_folder is not None:
        for plan in sorted(plan_folder.glob("*.plan")):
            table.add_row(
                f"tensorrt/{plan_folder.name}/{plan.name}",
                "fp16" if "fp16" in plan.name else "fp32",
                f"{plan.stat().st_size / 1e6:.1f}",
            )
    Console().print(table)
    if signature.parity is not None:
        p = signature.parity
        fp32 = ", ".join(f"{k} {v:.2g}" for k, v in p.fp32_max_abs_diff.items())
        line = f"parity (max abs diff): fp32 {fp32} (tol {p.fp32_tolerance:g}); {p.sequence_steps}-step round trip {p.sequence_max_abs_diff:.2g}"
        if p.fp16_max_abs_diff:
            line += (
                "; fp16 "
                + ", ".join(f"{k} {v:.2g}" for k, v in p.fp16_max_abs_diff.items())
                + f" (tol {p.fp16_tolerance:g})"
            )
        Console().print(line)
    where = f"attached to {resolved.name} version {resolved.version}" if attach else f"written to {folder}"
    Console().print(where)
    return 0


def attach_onnx(resolved, signature) -> None:
    """Puts onnx/ on the MLflow version it came from, with the parity figures (also used by the demo)."""
    from mobile_vla.tracking import attach_artifacts, log_version_metrics, set_version_tags

    attach_artifacts(resolved.name, resolved.version, resolved.path / "onnx", "onnx")
    parity = signature.parity
    set_version_tags(
        resolved.name,
        resolved.version,
        {
            "export.onnx": ",".join(g.precision for k, g in sorted(signature.graphs.items()) if k.startswith("step")),
            "export.opset": signature.opset,
            "export.exporter": "dynamo" if signature.exporter.dynamo else "legacy",
        },
    )
    metrics = {
        "parity_fp32_max_abs_diff": max(parity.fp32_max_abs_diff.values()),
        "parity_sequence_max_abs_diff": parity.sequence_max_abs_diff,
    }
    if parity.fp16_max_abs_diff:
        metrics["parity_fp16_max_abs_diff"] = max(parity.fp16_max_abs_diff.values())
    log_version_metrics(resolved.name, resolved.version, metrics)
