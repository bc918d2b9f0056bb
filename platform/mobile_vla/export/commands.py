"""`mobile-vla export --model MODEL_URI [--fp16] [--int8] [--tensorrt]`: graphs, parity, signature, on the version.

    mobile-vla export --model models:/mobile-vla-policy@challenger --fp16
    mobile-vla export --model models:/mobile-vla-policy@challenger --int8 --data data/nav   # CPU / edge
    mobile-vla export --model models:/mobile-vla-policy/3 --tensorrt --max-batch 64   # per GPU model

The ONNX files go to the version's `onnx/` (the same MLflow model version they came from), a
TensorRT plan to `tensorrt/<gpu>__trt<version>/`. A version that already has verified ONNX graphs
keeps them (a plan is built from exactly those bytes), and a valid plan for this GPU stays, unless
--force or its max batch is below --max-batch (give the serve config's max_batch_size: serving
refuses a plan that takes fewer robots than the config batches); --int8 adds model.int8.onnx to such
graphs (quantized from their model.onnx, calibrated on --data's frames, refused if it answers too
differently from fp32). The work is `mobile_vla.export.publish` (the demo and serving replicas use
it too).
"""

from __future__ import annotations

import argparse

from mobile_vla.errors import ConfigError, ResourceError


def register(subparsers) -> None:
    """Adds `mobile-vla export` to the CLI."""
    parser = subparsers.add_parser(
        "export",
        help="export a model version to ONNX (fp32/fp16/int8) and TensorRT, with parity checks",
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
        "--int8",
        action="store_true",
        help="also write model.int8.onnx (ONNX Runtime static int8, calibrated on --data's frames; for CPUs and edge)",
    )
    parser.add_argument(
        "--tensorrt", action="store_true", help="build a TensorRT plan for this GPU (needs a GPU and TensorRT)"
    )
    parser.add_argument(
        "--data",
        metavar="DIR",
        default=None,
        help="dataset folder whose frames the parity check (and --int8's calibration) uses "
        "(default: render MiniWorld frames)",
    )
    parser.add_argument(
        "--exporter",
        choices=("dynamo", "legacy"),
        default="dynamo",
        help="torch.onnx exporter (default dynamo; falls back to legacy if dynamo fails)",
    )
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    parser.add_argument(
        "--max-batch",
        type=int,
        default=32,  # tensorrt_engine.DEFAULT_MAX_BATCH (not imported here: it loads torch)
        help="largest batch the TensorRT plan must take: the serve config's max_batch_size "
        "(default 32; serve_configs/gpu.yaml: 64); a valid plan with a larger one is kept",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="re-export ONNX (and rebuild the TensorRT plan) even if the version already has them",
    )
    parser.add_argument("--no-attach", action="store_true", help="write files locally only, do not attach to MLflow")
    parser.set_defaults(func=run_export)


def run_export(args) -> int:
    """`mobile-vla export`: publish the version's ONNX graphs (and a TensorRT plan), then print what it holds."""
    # Imported here, not at the top: the CLI imports this module to build --help, and these load
    # torch, onnxruntime and MLflow.
    from rich.console import Console

    from mobile_vla.export.publish import is_registered, publish_onnx, publish_plan
    from mobile_vla.export.tensorrt_engine import require_cuda_gpu, require_tensorrt
    from mobile_vla.tracking import resolve_model

    console = Console(stderr=True)
    if args.max_batch < 1:
        raise ConfigError(f"--max-batch = {args.max_batch}: expected >= 1")
    if args.tensorrt:  # say so before any work: nothing gets half-done on a machine without a GPU
        try:
            require_tensorrt()
            require_cuda_gpu()
        except ResourceError as exc:
            raise ResourceError(
                f"--tensorrt: {exc}; nothing was exported (run without --tensorrt for ONNX only)"
            ) from None

    resolved = resolve_model(args.model)
    attach = not args.no_attach
    with console.status("exporting") as status:
        published = publish_onnx(
            resolved,
            fp16=args.fp16,
            int8=args.int8,
            exporter=args.exporter,
            opset=args.opset,
            data_dir=args.data,
            force=args.force,
            attach=attach,
            progress=lambda text: status.update(text),
        )
    if not published.exported:
        console.print(
            f"[dim]{resolved.path}/onnx already holds verified graphs (exported {published.signature.created_at}); "
            "keeping them (--force re-exports)[/dim]"
        )
    for note in published.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    plan = None
    if args.tensorrt:
        with console.status("building the TensorRT plan (minutes)"):
            plan = publish_plan(
                resolved,
                fp16=args.fp16,
                max_batch=args.max_batch,
                rebuild=args.force,
                attach=attach,
                data_dir=args.data,
            )
    _print_summary(resolved, published.signature, plan, attached=attach and is_registered(resolved))
    return 0


def _print_summary(resolved, signature, plan, attached: bool) -> None:
    """The files the version now holds, the parity figures, and where they went."""
    from rich.console import Console  # see run_export
    from rich.table import Table

    table = Table(title=f"export of {resolved.uri}", show_header=True)
    table.add_column("file")
    table.add_column("precision")
    table.add_column("MB", justify="right")
    for graph in signature.graphs.values():
        table.add_row(f"onnx/{graph.file}", graph.precision, f"{graph.bytes / 1e6:.1f}")
    if plan is not None:
        for path in sorted(plan.parent.glob("*.plan")):
            table.add_row(
                f"tensorrt/{plan.parent.name}/{path.name}",
                "fp16" if "fp16" in path.name else "fp32",
                f"{path.stat().st_size / 1e6:.1f}",
            )
    Console().print(table)
    if signature.parity is not None:
        p = signature.parity
        fp32 = ", ".join(f"{k} {v:.2g}" for k, v in p.fp32_max_abs_diff.items())
        line = (
            f"parity (max abs diff): fp32 {fp32} (tol {p.fp32_tolerance:g}); "
            f"{p.sequence_steps}-step round trip {p.sequence_max_abs_diff:.2g}"
        )
        if p.fp16_max_abs_diff:
            fp16 = ", ".join(f"{k} {v:.2g}" for k, v in p.fp16_max_abs_diff.items())
            line += f"; fp16 {fp16} (tol {p.fp16_tolerance:g})"
        Console().print(line)
        if p.int8 is not None:
            worst = {k: max(d[k] for d in p.int8.max_abs_diff.values()) for k in ("actions", "confidence")}
            Console().print(
                f"int8 vs fp32 (max abs diff): actions {worst['actions']:.2g} (tol {p.int8.actions_tolerance:g}), "
                f"confidence {worst['confidence']:.2g} (tol {p.int8.confidence_tolerance:g})"
            )
    where = f"attached to {resolved.name} version {resolved.version}" if attached else f"written to {resolved.path}"
    Console().print(where)
