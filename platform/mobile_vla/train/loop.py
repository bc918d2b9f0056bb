"""`train_loop_per_worker(config)`: what every Ray Train worker runs.

One epoch = one pass over this worker's shard of the training windows (Ray Data streams each worker an
equal share, so every rank takes the same number of steps and DDP's all-reduce never waits on a rank that
ran out), then validation on the held-out split, then one `ray.train.report` per epoch on every rank
(it is a barrier) with a checkpoint from rank 0. Side effects (MLflow, checkpoint files, printing) happen
on rank 0 only.

config keys (built by `trainer.loop_config`): job (TrainJobConfig as a dict), preprocessing (packed
folder), steps_per_epoch (optimiser steps), run_id + tracking_uri (MLflow, or None).
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
from pathlib import Path

INPUT_KEYS = (
    "images",
    "state",
    "frame_mask",
    "clip_input_ids",
    "kosmos_input_ids",
    "kosmos_attention_mask",
    "kosmos_image_embeds_position_mask",
)
VAL_SAMPLE_POINTS = 3000  # predicted-vs-true points kept per epoch for the plot


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float):
    """LR multiplier: linear warm-up from ~0 to 1, then cosine annealing down to min_ratio."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def param_groups(model, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms and embeddings' 1-D parameters (the usual AdamW practice)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def with_last_flag(iterable, waited: list[float] | None = None):
    """Yields (item, is_last) so the final partial accumulation group still steps the optimiser.

    `waited[0]` accumulates the seconds spent blocked on the iterator: time the model sat idle waiting
    for data, which says whether the input pipeline is the bottleneck.
    """
    iterator = iter(iterable)

    def pull():
        started = time.perf_counter()
        try:
            return next(iterator)
        finally:
            if waited is not None:
                waited[0] += time.perf_counter() - started

    try:
        current = pull()
    except StopIteration:
        return
    while True:
        try:
            upcoming = pull()
        except StopIteration:
            yield current, True
            return
        yield current, False
        current = upcoming


def autocast_context(precision: str, device):
    import torch

    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


class RankZeroTracker:
    """Buffers metrics and sends them to the run in batches (one SQLite/HTTP round trip per flush)."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self.run_id = run_id
        self.pending: list = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(key, float(value), now, step) for key, value in metrics.items()]
        if len(self.pending) >= 200:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.client.log_batch(self.run_id, metrics=self.pending)
            self.pending = []


def _write_pid(pid_dir: str | None, rank: int) -> None:
    """Fault-injection hook: a test (or an operator) can find and kill a worker by its pid file."""
    if pid_dir:
        Path(pid_dir).mkdir(parents=True, exist_ok=True)
        target = Path(pid_dir) / f"rank{rank}.pid"
        tmp = target.with_suffix(".tmp")
        tmp.write_text(str(os.getpid()))
        tmp.replace(target)


def _is_distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _sum_across_ranks(values: list[float], device) -> list[float]:
    import torch
    import torch.distributed as dist

    if not _is_distributed():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def _gather_to_all(array):
    """Concatenates a numpy array from every rank (validation predictions; small)."""
    import numpy as np
    import torch.distributed as dist

    if not _is_distributed():
        return array
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, array)
    return np.concatenate(parts, axis=0)


UNUSED_BY_POLICY = ("logit_scale", "logit_bias")  # CLIP's contrastive temperature: no path to the policy loss


def wrap_model(model, strategy: str, device):
    """DDP via Ray's prepare_model; FSDP2 (`fully_shard`) per transformer block, then the root.

    Parameters that never receive a gradient would make DDP's reducer wait forever (or error), so they
    are frozen first instead of paying for `find_unused_parameters=True` on every step.
    """
    import ray.train.torch

    for name, param in model.named_parameters():
        if name.rsplit(".", 1)[-1] in UNUSED_BY_POLICY:
            param.requires_grad_(False)

    if strategy == "ddp" or not _is_distributed():
        return ray.train.torch.prepare_model(model, parallel_strategy="ddp" if _is_distributed() else None)
    from torch.distributed.fsdp import fully_shard

    model = model.to(device)
    # fully_shard refuses 0-d parameters; the only ones here are frozen (CLIP's logit_scale), so leaving
    # them replicated and outside FSDP changes nothing. A trainable one would silently diverge: refuse it.
    scalars = {p for p in model.parameters() if p.ndim == 0}
    trainable = [n for n, p in model.named_parameters() if p.ndim == 0 and p.requires_grad]
    if trainable:
        raise RuntimeError(f"train.strategy = 'fsdp': trainable 0-d parameters {trainable} cannot be sharded")
    block_suffixes = ("EncoderLayer", "DecoderLayer", "ResidualAttentionBlock", "Block")
    for module in model.modules():
        if type(module).__name__.endswith(block_suffixes) and module is not model:
            fully_shard(module, ignored_params=scalars)
    fully_shard(model, ignored_params=scalars)
    return model


def unwrap(model):
    return getattr(model, "module", model)


def full_model_state(model, strategy: str) -> dict:
    """Full (unsharded) CPU weights; a collective under FSDP, so every rank calls it."""
    if strategy != "fsdp" or not _is_distributed():
        return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model, optimizer, strategy: str) -> dict:
    if strategy != "fsdp" or not _is_distributed():
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model, optimizer, model_state: dict, optimizer_state: dict, strategy: str) -> None:
    if strategy != "fsdp" or not _is_distributed():
        unwrap(model).load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)


def model_inputs(batch: dict) -> dict:
    return {key: batch[key] for key in INPUT_KEYS if key in batch}


def valid_points(output_actions, batch) -> tuple:
    """Masked predicted and target action rows [N, 3] (normalised), as float32 numpy arrays."""
    mask = batch["action_mask"] * batch["frame_mask"].unsqueeze(-1)  # [B, T, K]
    keep = mask.reshape(-1) > 0
    pred = output_actions.float().reshape(-1, 3)[keep]
    true = batch["actions"].float().reshape(-1, 3)[keep]
    return pred.detach().cpu().numpy(), true.detach().cpu().numpy()


def validate(model, shard, preprocessing, cfg, device) -> tuple[dict, tuple]:
    """Loss and MAE/RMSE/R² per axis on de-normalised actions over the whole validation split."""
    import numpy as np
    import torch

    from mobile_vla.policy.losses import action_metrics, policy_loss

    model.eval()
    loss_sum, count = 0.0, 0
    preds, trues = [], []
    with torch.no_grad(), autocast_context(cfg.train.precision, device):
        for batch in shard.iter_torch_batches(batch_size=cfg.train.batch_size, device=device):
            output = model(model_inputs(batch))
            size = int(batch["images"].shape[0])
            loss_sum += float(policy_loss(output, batch)["loss"]) * size
            count += size
            pred, true = valid_points(output.actions, batch)
            preds.append(pred)
            trues.append(true)
    loss_sum, count = _sum_across_ranks([loss_sum, float(count)], device)
    empty = np.zeros((0, 3), np.float32)
    pred = _gather_to_all(np.concatenate(preds) if preds else empty)
    true = _gather_to_all(np.concatenate(trues) if trues else empty)
    pred, true = preprocessing.denormalise_actions(pred), preprocessing.denormalise_actions(true)
    metrics = {"val_loss": loss_sum / max(count, 1.0)}
    metrics.update({f"val_{k}": float(v) for k, v in action_metrics(pred, true).items()})
    pick = np.random.default_rng(0).permutation(len(pred))[:VAL_SAMPLE_POINTS]
    model.train()
    return metrics, (pred[pick], true[pick])


def train_loop_per_worker(config: dict) -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import numpy as np
    import ray.train
    import ray.train.torch
    import torch

    from mobile_vla.policy import build_policy, load_policy
    from mobile_vla.policy.losses import policy_loss
    from mobile_vla.policy.preprocessing import Preprocessing
    from mobile_vla.train import checkpointing
    from mobile_vla.train.job_config import TrainJobConfig
    from mobile_vla.train.preflight import resolve_policy_config

    cfg = TrainJobConfig.model_validate(config["job"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    _write_pid(cfg.run.pid_dir, rank)
    device = ray.train.torch.get_device()
    strategy = cfg.train.strategy

    workdir = Path(tempfile.mkdtemp(prefix="mobile-vla-worker-"))
    preprocessing = Preprocessing.load(checkpointing.unpack_folder(config["preprocessing"], workdir / "prep"))

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    np.random.seed(cfg.train.seed + rank)
    policy_config = resolve_policy_config(cfg)
    model = wrap_model(build_policy(policy_config), strategy, device)
    optimizer = torch.optim.AdamW(
        param_groups(unwrap(model), cfg.optim.weight_decay),
        lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas),
        fused=device.type == "cuda",
    )
    steps_per_epoch = int(config["steps_per_epoch"])
    total_steps = steps_per_epoch * cfg.train.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(cfg.optim.warmup_steps, total_steps, cfg.optim.min_lr_ratio)
    )

    progress = checkpointing.Progress()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            restored, _ = load_policy(Path(folder) / checkpointing.POLICY_DIR)
            state, progress = checkpointing.read_train_state(folder)
        load_full_state(model, optimizer, restored.state_dict(), state["optimizer"], strategy)
        scheduler.load_state_dict(state["scheduler"])
        del restored
        if rank == 0:
            print(f"[mobile-vla] resuming at epoch {progress.epoch} step {progress.step} from {checkpoint.path}")

    resumed_from_epoch = progress.epoch  # 0 for a fresh start; > 0 after a resume or a worker restart
    tracker = None
    if rank == 0 and config.get("run_id"):
        tracker = RankZeroTracker(config["tracking_uri"], config["run_id"])

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    accumulate = cfg.optim.accumulate
    job_dict = config["job"]
    model.train()

    for epoch in range(progress.epoch, cfg.train.epochs):
        started = time.perf_counter()
        epoch_loss, epoch_batches, samples = 0.0, 0, 0
        window_loss, micro = 0.0, 0
        batches = train_shard.iter_torch_batches(
            batch_size=cfg.train.batch_size,
            device=device,
            prefetch_batches=2,
            local_shuffle_buffer_size=max(2 * cfg.train.batch_size, 32),
            local_shuffle_seed=cfg.train.seed + epoch,
        )
        waited = [0.0]
        for batch, is_last in with_last_flag(batches, waited):
            micro += 1
            stepping = micro % accumulate == 0 or is_last
            sync = contextlib.nullcontext()
            if not stepping and _is_distributed():
                if strategy == "ddp":
                    sync = model.no_sync()
                else:
                    model.set_requires_gradient_sync(False)
            with sync, autocast_context(cfg.train.precision, device):
                losses = policy_loss(model(model_inputs(batch)), batch)
                (losses["loss"] / accumulate).backward()
            if strategy == "fsdp" and _is_distributed():
                model.set_requires_gradient_sync(True)
            loss_value = float(losses["loss"].detach())
            epoch_loss += loss_value
            window_loss += loss_value
            epoch_batches += 1
            samples += int(batch["images"].shape[0])
            if not stepping:
                continue
            if cfg.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            progress.step += 1
            groups = accumulate if micro % accumulate == 0 else micro % accumulate
            micro = 0
            if progress.step % cfg.train.log_every_n_steps == 0 or is_last:
                point = {"step": progress.step, "loss": window_loss / groups, "lr": scheduler.get_last_lr()[0]}
                progress.steps.append(point)
                if tracker:
                    tracker.log({"train_loss_step": point["loss"], "lr": point["lr"]}, progress.step)
            window_loss = 0.0

        seconds = time.perf_counter() - started
        train_loss = _sum_across_ranks([epoch_loss, float(epoch_batches)], device)
        global_samples = _sum_across_ranks([float(samples)], device)[0]
        metrics, val_sample = validate(model, val_shard, preprocessing, cfg, device)
        progress.epoch = epoch + 1
        metrics.update(
            {
                "epoch": progress.epoch,
                "step": progress.step,
                "train_loss": train_loss[0] / max(train_loss[1], 1.0),
                "samples_per_s": global_samples / max(seconds, 1e-9),
                "epoch_seconds": seconds,
                "resumed_from_epoch": resumed_from_epoch,
                "data_wait_fraction": waited[0] / max(seconds, 1e-9),  # rank 0's share of the epoch spent waiting
            }
        )
        progress.epochs.append(dict(metrics))

        sharded = strategy == "fsdp" and _is_distributed()
        model_state = full_model_state(model, strategy) if sharded else None  # a collective under FSDP
        optimizer_state = full_optimizer_state(model, optimizer, strategy)
        with tempfile.TemporaryDirectory(prefix="mobile-vla-ckpt-") as tmp:
            report_checkpoint = None
            if rank == 0:
                shipped = unwrap(model)
                if sharded:  # rank 0 holds the gathered weights; save them through an unsharded twin
                    shipped = build_policy(policy_config, load_pretrained=False)
                    shipped.load_state_dict(model_state)
                checkpointing.write_checkpoint(
                    tmp,
                    model=shipped,
                    preprocessing=preprocessing,
                    optimizer_state=optimizer_state,
                    scheduler_state=scheduler.state_dict(),
                    progress=progress,
                    job_config=job_dict,
                    metrics=metrics,
                    val_sample=val_sample,
                )
                report_checkpoint = ray.train.Checkpoint.from_directory(tmp)
                if tracker:
                    tracker.log({k: v for k, v in metrics.items() if k not in ("epoch", "step")}, progress.epoch)
                    tracker.flush()
                print(
                    f"[mobile-vla] epoch {progress.epoch}/{cfg.train.epochs} step {progress.step} "
                    f"train_loss {metrics['train_loss']:.4f} val_loss {metrics['val_loss']:.4f} "
                    f"val_mae {metrics.get('val_mae', float('nan')):.4f} {metrics['samples_per_s']:.1f} samples/s"
                )
            ray.train.report(
                metrics, checkpoint=report_checkpoint, checkpoint_dir_name=f"checkpoint_epoch_{progress.epoch:04d}"
            )
