"""The one training loop, shared by pretraining and fine-tuning.

Each optimizer step draws grad_accum micro-batches, and the loss of each is its SUM over items
divided by the number of items in the whole step (all micro-batches, all ranks), so the accumulated
gradient equals the gradient of the large batch exactly, whatever the padding or masking.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lmforge._io import make_dirs, remove_empty_dirs
from lmforge.errors import TrainingError
from lmforge.training import distributed as D
from lmforge.training.checkpointing import CONFIG_FILE, RunDir, write_dir_atomic
from lmforge.training.config import RESUMABLE_CHANGES, TrainConfig, check_metric_name, config_differences
from lmforge.training.flops import flops_per_token, matmul_peak_flops
from lmforge.training.optim import learning_rate, make_optimizer

Batch = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], "tuple[torch.Tensor, torch.Tensor | int]"]


class BatchSource(Protocol):
    def next_batch(self) -> Batch: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def causal_lm_loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over positions whose label is not -100, and their count."""
    logits = model(batch["input_ids"], attention_mask=batch.get("attention_mask"),
                   position_ids=batch.get("position_ids")).logits
    labels = batch["labels"]
    loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.view(-1), ignore_index=-100, reduction="sum")
    return loss, (labels != -100).sum()


def count_items(batch: Batch) -> torch.Tensor:
    """Items a micro-batch contributes to the loss: labels that are not -100 (tokens or examples)."""
    return (batch["labels"] != -100).sum()


@dataclass
class TrainResult:
    step: int
    tokens: int
    metrics: dict[str, float]
    model_dir: Path
    best_dir: Path | None
    elapsed: float
    stopped_by: str
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: int | None = None  # the checkpoint step a --resume continued from

    @property
    def nothing_to_do(self) -> bool:
        """A --resume of a run that had already reached its stopping point."""
        return self.resumed_from is not None and self.step == self.resumed_from


class RunSession:
    """One process's hold on a run directory for a run's lifetime: the lock (rank 0 takes it; every
    rank learns whether it got it), and on failure before the run started (no config.json yet) the
    removal of what this invocation created there, so a failed start leaves no empty folders."""

    def __init__(self, run: RunDir, dist: D.DistInfo) -> None:
        self.run, self.dist = run, dist
        self.created: list[Path] = []  # folders made for the run (outermost first)
        self.made: list[Path] = []  # folders filled for the run, removed whole if it never starts

    @contextlib.contextmanager
    def hold(self) -> Iterator["RunSession"]:
        lock, error = contextlib.ExitStack(), None
        if self.dist.is_main:
            try:
                self.created = make_dirs(self.run.path)
                lock.enter_context(self.run.lock())
            except (TrainingError, OSError) as e:
                error = e if isinstance(e, TrainingError) else TrainingError(
                    f"cannot use {self.run.path} as the run directory: {e.strerror or e}; choose another --out")
                remove_empty_dirs(self.created)
        if not D.broadcast_flag(error is None, self.dist):
            raise error or TrainingError(f"{self.run.path} is in use by another run (rank 0 says which)")
        try:
            yield self
        except BaseException:
            lock.close()
            if self.dist.is_main and not (self.run.path / CONFIG_FILE).exists():
                for p in self.made:
                    shutil.rmtree(p, ignore_errors=True)
                remove_empty_dirs(self.created)
            raise
        lock.close()


class Trainer:
    """Trains `model` on `train_data` under `config`, checkpointing to config.out_dir.

    model: an nn.Module with save_pretrained(dir, tokenizer=None) and load_weights(dir).
    train_data: a BatchSource (see lmforge.training.sources). val_data: a zero-argument callable
    returning an iterable of batches. loss_fn(model, batch) -> (loss sum, item count).
    eval_fn(model) -> {name: value}: extra validation metrics (best_metric may name one).
    extra_config: what else defines the run (model shape, data), saved in config.json and compared
    on --resume. eval_metrics: the names eval_fn returns, so a best_metric typo fails before training.
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        train_data: BatchSource,
        val_data: Callable[[], Iterable[Batch]] | None = None,
        *,
        loss_fn: LossFn = causal_lm_loss,
        eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
        tokenizer: Any = None,
        extra_config: dict[str, Any] | None = None,
        dist: D.DistInfo | None = None,
        eval_metrics: Sequence[str] | None = None,
    ) -> None:
        self.config = config
        validated = val_data is not None and config.eval_batches > 0
        if eval_fn is None or eval_metrics is not None:  # else eval_fn's names are known only once it runs
            check_metric_name(config.best_metric, (["val_loss", "val_ppl"] if validated else []) + list(eval_metrics or []))
        self.dist = dist or D.init_distributed(config.device)
        self.device = self.dist.device
        self.train_data, self.val_data = train_data, val_data
        self.loss_fn, self.eval_fn, self.tokenizer = loss_fn, eval_fn, tokenizer
        self.run = RunDir(config.out_dir)
        self.run_config = {"train": config.to_dict(), **(extra_config or {}),
                           "world_size": self.dist.world_size}

        if config.dtype == "fp16" and self.device.type != "cuda":
            raise TrainingError("dtype fp16 needs a CUDA device (it trains with a gradient scaler there); "
                                "use --dtype bf16 on the CPU")
        to_hf = getattr(getattr(model, "config", None), "to_hf_dict", None)
        if callable(to_hf):
            to_hf()  # a config no checkpoint can express fails now, not at the first save after training
        torch.manual_seed(config.seed + self.dist.rank)
        self.raw_model = model.to(self.device)
        if config.grad_checkpointing:
            if not hasattr(model, "gradient_checkpointing"):
                raise TrainingError(f"{type(model).__name__} does not support gradient checkpointing")
            model.gradient_checkpointing = True
        self.sharded = config.fsdp and self.dist.distributed
        self.model = D.wrap_model(model, self.dist, config.fsdp)  # before the optimizer: FSDP swaps parameters
        self.optimizer = make_optimizer(model, config, self.device)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if config.compile:
            self.model = torch.compile(self.model)
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.dtype)
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=amp)) if amp else contextlib.nullcontext
        self.scaler = torch.amp.GradScaler("cuda") if config.dtype == "fp16" else None
        self.step, self.tokens, self.elapsed = 0, 0, 0.0
        self.best: float | None = None
        self.resumed_from: int | None = None
        self.final_model: nn.Module | None = None  # after train(): the whole trained model on rank 0 (gathered under FSDP)
        self.flops_per_token = flops_per_token(model, config.block_size)
        self.peak_flops: float | None = None

    # ---- the loop ----------------------------------------------------------------------------

    def train(self) -> TrainResult:
        """Run (or, with config.resume, continue) to the first stopping point; write RUN/model."""
        with RunSession(self.run, self.dist).hold():
            return self._train()

    def _train(self) -> TrainResult:
        cfg, main = self.config, self.dist.is_main
        self._start_run()
        if self.resumed_from is not None and (reason := self._should_stop()):
            return self._already_done(reason)
        if main and self.flops_per_token and cfg.progress:
            self.peak_flops = matmul_peak_flops(self.device, torch.bfloat16 if cfg.dtype != "fp32" else torch.float32)
        bar = _progress_bar(cfg, self.step) if main and cfg.progress else None
        history: list[dict[str, Any]] = []
        stopped_by = "max_steps"
        start_time, start_tokens = time.perf_counter() - self.elapsed, self.tokens
        window_start, window_tokens, window_loss, window_steps = time.perf_counter(), 0, 0.0, 0
        last_saved = self.step
        try:
            while True:
                self.elapsed = time.perf_counter() - start_time
                reason = self._should_stop()
                if reason:
                    stopped_by = reason
                    break
                loss, grad_norm, tokens = self._train_step()
                self.step += 1
                self.tokens += tokens
                window_loss, window_steps, window_tokens = window_loss + loss, window_steps + 1, window_tokens + tokens
                if self.step % cfg.log_interval == 0 or self.step == cfg.max_steps:
                    now = time.perf_counter()
                    row = self._log_row(window_loss / window_steps, grad_norm, window_tokens, now - window_start, window_steps)
                    history.append(row)
                    if main:
                        self.run.log(row)
                    if bar is not None:
                        bar.set_postfix_str(f"loss {row['loss']:.4f}  {row['tokens_per_s']:,.0f} tok/s"
                                            + (f"  MFU {row['mfu']:.1%}" if "mfu" in row else ""))
                    window_start, window_tokens, window_loss, window_steps = now, 0, 0.0, 0
                if bar is not None:
                    bar.update(1)
                if self.step % cfg.eval_interval == 0:
                    history.append(self._evaluate_and_log())
                if self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                    last_saved = self.step
        finally:
            if bar is not None:
                bar.close()
        self.elapsed = time.perf_counter() - start_time
        if self.step % cfg.eval_interval or self.step == 0:  # not just evaluated inside the loop
            history.append(self._evaluate_and_log())
        metrics = history[-1]
        if self.step != last_saved:
            self.save_checkpoint()
        final = self.final_model = self._export_model()
        if main:
            write_dir_atomic(self.run.model_dir, lambda d: self._save_model(d, final))
            self.run.log({"event": "end", "step": self.step, "tokens": self.tokens, "stopped_by": stopped_by,
                          "elapsed": round(self.elapsed, 3), "tokens_per_s": (self.tokens - start_tokens) / max(self.elapsed, 1e-9)})
        D.barrier(self.dist)
        best = self.run.best_dir if (cfg.best_metric and self.run.best_dir.is_dir()) else None
        return TrainResult(self.step, self.tokens, {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                           self.run.model_dir, best, self.elapsed, stopped_by, history, self.resumed_from)

    def _already_done(self, reason: str) -> TrainResult:
        """A resumed run already at its stopping point: write RUN/model if a kill cut it short, report."""
        final = self.final_model = self._export_model()
        if self.dist.is_main:
            if not (self.run.model_dir / "config.json").is_file():
                write_dir_atomic(self.run.model_dir, lambda d: self._save_model(d, final))
            limit = {"max_steps": self.config.max_steps, "max_tokens": self.config.max_tokens,
                     "max_time": self.config.max_time}[reason]
            _print_above_bar(f"already at {reason} {limit}; nothing to do")
        D.barrier(self.dist)
        evals = [r for r in self.run.read_metrics() if "event" not in r and "loss" not in r and r.get("step") == self.step]
        metrics = {k: v for k, v in (evals[-1] if evals else {}).items() if isinstance(v, (int, float))}
        best = self.run.best_dir if (self.config.best_metric and self.run.best_dir.is_dir()) else None
        return TrainResult(self.step, self.tokens, metrics, self.run.model_dir, best, self.elapsed, reason, [],
                           self.resumed_from)

    def _should_stop(self) -> str | None:
        cfg = self.config
        if self.step >= cfg.max_steps:
            return "max_steps"
        if cfg.max_tokens is not None and self.tokens >= cfg.max_tokens:
            return "max_tokens"
        if cfg.max_time is not None and D.broadcast_flag(self.elapsed >= cfg.max_time, self.dist):
            return "max_time"
        return None

    def _train_step(self) -> tuple[float, float | None, int]:
        cfg = self.config
        lr = learning_rate(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        micro = [self.train_data.next_batch() for _ in range(cfg.grad_accum)]
        loss_value, total_tokens = self.accumulate_gradients(micro)
        if not math.isfinite(loss_value):
            self.optimizer.zero_grad(set_to_none=True)
            latest = self.run.latest_checkpoint()
            raise TrainingError(f"the loss became {loss_value} at step {self.step + 1}; stopped without updating the "
                                f"weights. The last good checkpoint is {latest or 'none (none was written yet)'}; "
                                f"lower --lr, raise --warmup-steps or use --dtype fp32, then --resume")
        grad_norm = None
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if cfg.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip))
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, grad_norm, total_tokens

    def accumulate_gradients(self, micro: list[Batch]) -> tuple[float, int]:
        """Forward and backward over the micro-batches of one step, leaving the gradient of
        sum(item losses) / (items in the step, all ranks) in .grad. Returns (mean loss, tokens)."""
        cfg, dist = self.config, self.dist
        counts = torch.stack([count_items(b) for b in micro]).sum().to(self.device, torch.float64)
        tokens = torch.tensor(float(sum(b["input_ids"].numel() for b in micro)), device=self.device, dtype=torch.float64)
        totals = D.all_reduce_sum(torch.stack([counts, tokens]), dist)
        total_items, total_tokens = totals[0].item(), int(totals[1].item())
        if total_items == 0:
            raise TrainingError(f"step {self.step + 1}: no labels to learn from in this batch (every label is -100)")
        step_loss = torch.zeros((), device=self.device, dtype=torch.float64)
        self.model.train()
        try:
            for i, batch in enumerate(micro):
                batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
                last = i == len(micro) - 1
                sync = contextlib.nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync()
                with sync:
                    with self.autocast():
                        loss_sum, _ = self.loss_fn(self.model, batch)
                    # DDP averages gradients over ranks; scale up so the result is sum / global count.
                    loss = loss_sum * (dist.world_size / total_items)
                    (self.scaler.scale(loss) if self.scaler else loss).backward()
                step_loss += loss_sum.detach().to(torch.float64)
        except (torch.OutOfMemoryError, RuntimeError) as e:
            # CUDA raises OutOfMemoryError; the CPU allocator a RuntimeError "can't allocate memory".
            if not isinstance(e, torch.OutOfMemoryError) and "allocate memory" not in str(e):
                raise
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingError(f"out of memory at batch_size={cfg.batch_size} (block {cfg.block_size}): use a smaller "
                                f"--batch-size with a larger --grad-accum (same global batch), --grad-checkpointing, "
                                f"or --dtype bf16") from e
        return (D.all_reduce_sum(step_loss, dist) / total_items).item(), total_tokens

    # ---- evaluation and logging --------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean validation loss and perplexity over up to eval_batches batches, plus eval_fn's metrics."""
        cfg = self.config
        out: dict[str, float] = {}
        self.model.eval()
        try:
            if self.val_data is not None and cfg.eval_batches > 0:
                total = torch.zeros(2, dtype=torch.float64, device=self.device)
                for i, batch in enumerate(self.val_data()):
                    if i >= cfg.eval_batches:
                        break
                    batch = {k: v.to(self.device) for k, v in batch.items()}
                    with self.autocast():
                        loss_sum, count = self.loss_fn(self.model, batch)
                    total += torch.stack([loss_sum.detach().to(torch.float64),
                                          torch.as_tensor(count, dtype=torch.float64, device=self.device)])
                total = D.all_reduce_sum(total, self.dist)
                if total[1] > 0:
                    out["val_loss"] = (total[0] / total[1]).item()
                    out["val_ppl"] = math.exp(min(out["val_loss"], 700.0))
            if self.eval_fn is not None:
                with self.autocast():
                    out.update({k: float(v) for k, v in self.eval_fn(self.raw_model).items()})
        finally:
            self.model.train()
        return out

    def _evaluate_and_log(self) -> dict[str, Any]:
        metrics = self.evaluate()
        row = {"step": self.step, "tokens": self.tokens, **metrics}
        improved = self._improved(metrics)
        model = self._export_model() if improved else None  # every rank decides alike: metrics are all-reduced
        if self.dist.is_main:
            self.run.log(row)
            if improved:
                write_dir_atomic(self.run.best_dir, lambda d: self._save_model(d, model))
                self.run.log({"event": "best", "step": self.step, self.config.best_metric: self.best})
            if self.config.progress and metrics:
                shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                _print_above_bar(f"step {self.step}: {shown}")
        return row

    def _improved(self, metrics: dict[str, float]) -> bool:
        """Whether best_metric improved (then it becomes the new best)."""
        name = self.config.best_metric
        if not name:
            return False
        if name not in metrics:
            raise TrainingError(f"best_metric {name!r} is not among the validation metrics {sorted(metrics)}")
        value = metrics[name]
        if self.best is None or (value < self.best if self.config.best_mode == "min" else value > self.best):
            self.best = value
            return True
        return False

    def _log_row(self, loss: float, grad_norm: float | None, tokens: int, seconds: float, steps: int) -> dict[str, Any]:
        row: dict[str, Any] = {"step": self.step, "tokens": self.tokens, "loss": loss, "lr": learning_rate(self.step - 1, self.config),
                               "tokens_per_s": tokens / max(seconds, 1e-9), "ms_per_step": 1000 * seconds / steps,
                               "time": round(self.elapsed, 3)}
        if grad_norm is not None:
            row["grad_norm"] = grad_norm
        if self.flops_per_token and self.peak_flops:
            row["mfu"] = self.flops_per_token * row["tokens_per_s"] / (self.peak_flops * self.dist.world_size)
        return row

    # ---- checkpoints -------------------------------------------------------------------------

    def _save_model(self, directory: Path, model: nn.Module | None = None) -> None:
        (model or self.raw_model).save_pretrained(directory, tokenizer=self.tokenizer)

    def _export_model(self) -> nn.Module | None:
        """The model to save: itself, or under FSDP a full CPU copy gathered from the shards (a
        collective: every rank calls it; rank 0 gets the copy)."""
        if not self.sharded:
            return self.raw_model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.dist.is_main:
            return None
        copy = type(self.raw_model)(self.raw_model.config)
        copy.load_state_dict(full)
        return copy

    def _optimizer_state(self) -> dict[str, Any]:
        if not self.sharded:
            return self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, self.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def save_checkpoint(self) -> Path | None:
        """Model + optimizer + scaler + RNG (every rank's) + data position, atomically (rank 0 writes)."""
        rng = D.gather_objects({"cpu": torch.get_rng_state(),
                                "cuda": torch.cuda.get_rng_state() if self.device.type == "cuda" else None}, self.dist)
        model, optimizer = self._export_model(), self._optimizer_state()
        path = None
        if self.dist.is_main:
            state = {"step": self.step, "tokens": self.tokens, "elapsed": self.elapsed, "best": self.best,
                     "optimizer": optimizer, "scaler": self.scaler.state_dict() if self.scaler else None,
                     "rng": rng, "data": self.train_data.state_dict()}
            path = self.run.save_checkpoint(self.step, lambda d: self._save_model(d, model), state, self.config.keep_last)
        D.barrier(self.dist)
        return path

    def _start_run(self) -> None:
        cfg, run = self.config, self.run
        saved = run.read_config()
        if cfg.resume:
            if saved is None:
                raise TrainingError(f"--resume: {run.path} has no {run.path.name}/config.json; it is not a run "
                                    f"directory (drop --resume to start a new run there)")
            diff = config_differences(saved, self.run_config)
            if "data.fingerprint" in diff:
                was, now = saved.get("data", {}), self.run_config.get("data", {})
                raise TrainingError(
                    f"--resume: {run.path} was trained on other data ({_describe_data(was)}) than it is given now "
                    f"({_describe_data(now)}); resume with the run's own data (pretrain: leave out --data; "
                    f"finetune: the same files, which may have moved), or start a new --out directory")
            if diff:
                shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in list(diff.items())[:8]))
                may = ", ".join(sorted(RESUMABLE_CHANGES - {"resume", "out_dir"}))
                raise TrainingError(f"--resume: {run.path} was trained with a different configuration ({shown}); "
                                    f"a resumed run keeps the settings in its {CONFIG_FILE} (only {may} may change): "
                                    f"drop the differing options, or start a new --out directory")
            if self.dist.is_main:
                run.remove_partial_writes()
            D.barrier(self.dist)
            checkpoint = run.latest_checkpoint()
            if checkpoint is not None:
                self._restore(checkpoint)
                self.resumed_from = self.step
                if self.dist.is_main:
                    run.truncate_metrics(self.step)
                    run.log({"event": "resume", "step": self.step, "checkpoint": str(checkpoint)})
                    _print_above_bar(f"resumed from step {self.step} ({checkpoint})")
        elif saved is not None and (run.latest_checkpoint() is not None or run.metrics_file.exists()):
            raise TrainingError(f"{run.path} already holds a training run; pass --resume to continue it, or choose "
                                f"a new --out directory")
        if self.dist.is_main:
            run.path.mkdir(parents=True, exist_ok=True)
            run.write_config(self.run_config)
        D.barrier(self.dist)

    def _restore(self, checkpoint: Path) -> None:
        state = RunDir.load_state(checkpoint)
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)

            full = type(self.raw_model)(self.raw_model.config)
            full.load_weights(checkpoint / "model")
            options = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.model, full.state_dict(), options=options)
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=options)
        else:
            self.raw_model.load_weights(checkpoint / "model")
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        rng = state["rng"][self.dist.rank] if self.dist.rank < len(state["rng"]) else state["rng"][0]
        torch.set_rng_state(rng["cpu"])
        if rng.get("cuda") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"])
        self.train_data.load_state_dict(state["data"])
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.elapsed, self.best = float(state.get("elapsed", 0.0)), state.get("best")


def _describe_data(data: dict[str, Any]) -> str:
    where = data.get("directory") or ", ".join(str(data[k]) for k in ("train", "val") if data.get(k))
    parts = [str(where or "?")]
    if "train_tokens" in data:
        parts.append(f"{data['train_tokens']:,} train tokens")
    if "fingerprint" in data:
        parts.append(f"fingerprint {data['fingerprint']}")
    return ", ".join(parts)


# ---- speed accounting --------------------------------------------------------------------------


def _print_above_bar(text: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(text, file=sys.stderr)


def _progress_bar(cfg: TrainConfig, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=cfg.max_steps, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                disable=None if os.environ.get("LMFORGE_PROGRESS") != "1" else False)
