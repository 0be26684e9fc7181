"""The distillation loop on accelerate: optimizer steps, validation, checkpoints, accounting.

Each optimizer step takes `grad_accum` micro-batches per process. Before any backward
pass the step's NLL and KD target counts are summed over all its micro-batches and all
processes, and every micro-batch loss is divided by those totals — the loss is normalised
once per step, so 8 micro-batches of 1 and 1 micro-batch of 8 give the same gradient.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch

from essence.config.checks import check_unchanged
from essence.config.schema import Config, to_dict
from essence.data.batching import Batch, collate, plan_batches
from essence.data.pipeline import prepare
from essence.errors import EssenceError
from essence.faults import fault_point
from essence.models.runtime import make_accelerator
from essence.models.sharding import (
    engine_name,
    full_optimizer_state,
    load_optimizer_state,
    register_head,
    shard_teacher,
)
from essence.stopping import Stopped, StopRequest
from essence.teacher.sources import OnlineTeacher
from essence.train.accounting import Ledger, peak_memory_bytes, reset_peak_memory
from essence.train.checkpoint import (
    checkpoint_dir,
    choose_checkpoint,
    intact_note,
    load_trainer_state,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    save_model,
    set_rng_state,
)
from essence.train.rundir import resume_command, stop_message
from essence.train.sampling import build_sampler, generation_context, is_sampled_step
from essence.train.saving import SavedStudent
from essence.train.setup import (
    build_models,
    build_optimizer,
    split_validation,
    warn_global_batch,
)
from essence.train.step import (
    DistillStep,
    combine,
    continuation_count,
    continuation_loss_weight,
    loss_weights,
    step_token_counts,
)
from essence.train.tracking import MetricsLog, check_trackers, start_trackers


class Trainer:
    """Owns the loop: which batches form a step, when to log, validate and save."""

    def __init__(self, config: Config, run_dir: Path, resume: bool):
        self.config, self.run_dir = config, run_dir
        check_trackers(config.train.tracker)  # a missing package fails before any work
        self.accelerator = make_accelerator(config.train, project_dir=run_dir)
        self.is_main = self.accelerator.is_main_process
        checkpoint = choose_checkpoint(run_dir, self.is_main) if resume else None
        if checkpoint is not None:
            check_unchanged(run_dir / "config.yaml", config, f"the run in {run_dir}",
                            "resume with the same settings (only when to stop, log, validate or "
                            "save and the eval block may change), or train into a new --out")
        self.models = build_models(config, self.accelerator.device, checkpoint)
        prepared = prepare(config.data, self.models.tokenizer)
        self._report_skipped(prepared.skipped)
        self.train_set, self.val_set = split_validation(prepared, config)
        if self.models.teacher_cached:  # check the cache once; drop records it cannot serve
            self.train_set, self.val_set = self.models.teacher.bind(
                self.models.tokenizer, prepared, self.train_set, self.val_set)
            self.models.teacher_flops = self.models.teacher.flop_model()
        self.lengths = [len(e) for e in self.train_set]
        self.world = self.accelerator.num_processes
        if self.is_main:
            warn_global_batch(config.train, self.world)
        per_step = self.world * config.train.grad_accum
        self.steps_per_epoch = (len(self.train_set) // config.train.batch_size) // per_step
        if self.steps_per_epoch == 0:
            raise EssenceError(
                f"{len(self.train_set)} training records are too few for one optimizer step of "
                f"{config.train.batch_size} × {config.train.grad_accum} × {self.world} processes; "
                "lower train.batch_size or train.grad_accum"
            )
        self.total_steps = max(1, math.ceil(self.steps_per_epoch * config.train.epochs))
        if config.train.max_steps is not None:
            self.total_steps = min(self.total_steps, config.train.max_steps)
        self.sampler = (build_sampler(config, self.models, prepared.rendered, self.accelerator)
                        if config.sampling.active else None)
        step_module = DistillStep(self.models.student, config.loss, len(self.models.tokenizer),
                                  continuation_divergence=config.sampling.divergence,
                                  continuation_params=config.sampling.params)
        optimizer, self.scheduler = build_optimizer(self.models.student, config.train,
                                                    self.total_steps)
        # The scheduler stays unwrapped: accelerate would step it once per process.
        self.step_module, self.optimizer = self.accelerator.prepare(step_module, optimizer)
        register_head(self.accelerator, self.step_module)  # ZeRO-3 only (essence.models.sharding)
        if isinstance(self.models.teacher, OnlineTeacher):  # FSDP2: the teacher is sharded too
            shard_teacher(self.models.teacher.model, self.accelerator)
        self.ledger, self.step, self.elapsed = Ledger(), 0, 0.0
        self.last_train_loss, self.last_val_loss = None, None
        if checkpoint is not None:
            self._restore(checkpoint)
        trackers = (start_trackers(self.accelerator, config, to_dict(config), run_dir, self.step)
                    if self.is_main else [])
        self.log = MetricsLog(run_dir, self.is_main, resume_step=self.step, trackers=trackers)

    def _report_skipped(self, skipped) -> None:
        if skipped and self.is_main:
            print(f"essence: skipped {len(skipped)} bad records, e.g.:")
            for item in skipped[:3]:
                print(f"  {item}")

    def _restore(self, checkpoint: Path) -> None:
        state = load_trainer_state(checkpoint)
        load_optimizer_state(self.accelerator, self.step_module, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.step, self.elapsed = state["step"], state["elapsed"]
        # The checkpoint holds the all-process totals: the main process carries them on.
        self.ledger = Ledger(**state["ledger"]) if self.is_main else Ledger()
        self.last_train_loss, self.last_val_loss = state["train_loss"], state["val_loss"]
        if self.is_main:
            print(f"essence: resumed from {checkpoint} at step {self.step}/{self.total_steps}")

    def micro_batches(self, step: int) -> list[Batch]:
        """This process's micro-batches of optimizer step `step` (0-based, global)."""
        epoch, index = divmod(step, self.steps_per_epoch)
        plan = plan_batches(self.lengths, self.config.train.batch_size,
                            seed=self.config.train.seed, epoch=epoch)
        per_step = self.world * self.config.train.grad_accum
        group = plan[index * per_step:(index + 1) * per_step]
        mine = group[self.accelerator.process_index::self.world]
        pad_id = self.models.tokenizer.pad_token_id
        pack = self.config.data.packing
        return [collate([self.train_set[i] for i in ids], pad_id, pack) for ids in mine]

    def _reduce(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
        return self.accelerator.reduce(tensor, reduction="sum").tolist()

    def teacher_output(self, batch: Batch):
        """The teacher's targets for a batch, or None when the loss has no KD term (or the batch
        has no KD targets, as the dataset's NLL-only batch of a sampled step)."""
        if self.models.teacher is None or self.config.loss.kd_ratio == 0:
            return None
        cont = batch.continuation_mask
        if not bool(batch.kd_mask.any()) and (cont is None or not bool(cont.any())):
            return None
        packed = {} if batch.position_ids is None else {"position_ids": batch.position_ids}
        return self.models.teacher(batch.input_ids, batch.attention_mask, batch.record_ids, **packed)

    def optimizer_step(self, batches: list[Batch]) -> dict:
        """One optimizer step over this process's micro-batches; returns its metrics."""
        batches, generation_s = self._sample(batches)  # every generation before the first backward
        reduction = self.config.loss.reduction  # token counts, or sequence counts
        counts = [*step_token_counts(batches, reduction), continuation_count(batches)]
        n_nll, n_kd, n_cont = (int(v) for v in self._reduce(counts))
        kd_ratio = self.config.loss.kd_ratio
        weights = loss_weights(n_nll, n_kd, kd_ratio)
        w_cont = continuation_loss_weight(n_cont, self.config.sampling.continuation_weight)
        if weights == (0.0, 0.0) and w_cont == 0.0:
            raise EssenceError(
                f"step {self.step + 1} has no supervised tokens (records "
                f"{[r for b in batches for r in b.record_ids][:8]}); check data.supervision "
                "and data.truncation (an answer-only loss at a short LSP keeps no answer tokens)")
        sums = torch.zeros(3, dtype=torch.float64)
        for i, batch in enumerate(batches):
            batch = batch.to(self.accelerator.device)
            teacher = self.teacher_output(batch)
            sync = i == len(batches) - 1
            extra = {} if batch.continuation_mask is None else {  # lead_then_student's third term
                "continuation_mask": batch.continuation_mask, "continuation_weight": w_cont}
            with self.accelerator.no_sync(self.step_module) if not sync else nullcontext():
                out = self.step_module(batch.input_ids, batch.attention_mask, batch.nll_mask,
                                       batch.kd_mask, teacher, weights, **extra,
                                       position_ids=batch.position_ids)
                # DDP averages gradients over processes; our denominators are global sums.
                loss = combine(out, weights, w_cont) * self.world
                self.accelerator.backward(loss)
            cont = 0.0 if out.continuation is None else out.continuation.item()
            sums += torch.tensor([out.nll.item(), out.kd.item(), cont], dtype=torch.float64)
            self.ledger.add(batch, self.models.student_flops,
                            self.models.teacher_flops if teacher is not None else None,
                            cached=self.models.teacher_cached)
        nll_sum, kd_sum, cont_sum = self._reduce(sums.tolist())
        if not math.isfinite(nll_sum + kd_sum):
            ids = [r for b in batches for r in b.record_ids]
            raise EssenceError(
                f"non-finite loss at step {self.step + 1} (records {ids[:8]}); stopped without "
                f"saving; {intact_note(self.run_dir)}. Lower train.lr, or check those records"
            )
        grad_norm = None
        if self.config.train.max_grad_norm is not None:
            norm = self.accelerator.clip_grad_norm_(self.step_module.parameters(),
                                                    self.config.train.max_grad_norm)
            grad_norm = float(norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        nll = nll_sum / max(n_nll, 1)
        kd = kd_sum / max(n_kd, 1)
        loss = (1 - kd_ratio) * nll + (kd_ratio * kd if n_kd else 0.0)
        metrics = {"loss": loss, "nll": nll, "kd": kd if n_kd else None, "grad_norm": grad_norm,
                   "lr": self.scheduler.get_last_lr()[0]}
        if self.sampler is not None:
            cont = cont_sum / n_cont if n_cont else None
            metrics.update(sampled=generation_s is not None, generation_s=generation_s,
                           continuation_kd=cont)
            if cont is not None:
                metrics["loss"] = loss + self.config.sampling.continuation_weight * cont
        return metrics

    def _sample(self, batches: list[Batch]) -> tuple[list[Batch], float | None]:
        """The step's batches with sampled text when this step is drawn for sampling, and the
        seconds spent generating (None: not a sampled step)."""
        if self.sampler is None or not is_sampled_step(self.config.sampling, self.step):
            return batches, None
        teacher = self.models.teacher
        fsdp = self.accelerator.distributed_type.name == "FSDP"
        with generation_context(self.step_module, fsdp):
            batches, cost = self.sampler.sample(
                batches, self.step, self.accelerator.process_index, self.world, self.models.student,
                getattr(teacher, "model", None), self.models.student_flops, self.models.teacher_flops)
        self.ledger.add_generation(cost.tokens, cost.flops, cost.seconds, cost.sequences)
        return batches, cost.seconds

    @torch.no_grad()
    def validate(self) -> float | None:
        """Loss on the held-out whole sequences, normalised over the whole validation set."""
        if not self.val_set:
            return None
        self.step_module.eval()
        self._weights("eval")
        mine = self.val_set[self.accelerator.process_index::self.world]
        pad_id = self.models.tokenizer.pad_token_id
        batches = [collate(mine[i:i + self.config.train.batch_size], pad_id, self.config.data.packing)
                   for i in range(0, len(mine), self.config.train.batch_size)]
        n_nll, n_kd = self._reduce(list(step_token_counts(batches, self.config.loss.reduction)))
        weights = loss_weights(int(n_nll), int(n_kd), self.config.loss.kd_ratio)
        total = 0.0
        for batch in batches:
            batch = batch.to(self.accelerator.device)
            out = self.step_module(batch.input_ids, batch.attention_mask, batch.nll_mask,
                                   batch.kd_mask, self.teacher_output(batch),
                                   position_ids=batch.position_ids)
            total += float(combine(out, weights))
        self.step_module.train()
        self._weights("train")
        return self._reduce([total])[0]

    def global_ledger(self) -> Ledger:
        """The ledger summed over all processes (every process must call this)."""
        fields = asdict(self.ledger)
        return Ledger(**dict(zip(fields, self._reduce(list(fields.values())))))

    def _weights(self, mode: str) -> None:
        """Schedule-free AdamW holds two sets of weights: "train" for its steps, "eval" (the
        averaged ones) for validation, saves and evaluation. A no-op for AdamW."""
        if self.config.train.optimizer == "adamw_schedulefree":
            getattr(self.optimizer, mode)()

    def save(self, final: bool = False) -> None:
        """Checkpoint the student, optimizer, scheduler, RNG and position (main process);
        final: also the run's model/ folder. Under FSDP2 every process helps gather the weights."""
        self.accelerator.wait_for_everyone()
        totals = self.global_ledger()
        self._weights("eval")
        student = SavedStudent(self.accelerator, self.step_module, self.models.student)
        optimizer = full_optimizer_state(self.accelerator, self.step_module, self.optimizer)
        if self.is_main:
            state = {
                "step": self.step, "elapsed": self.elapsed, "ledger": asdict(totals),
                "optimizer": optimizer, "scheduler": self.scheduler.state_dict(),
                "rng": rng_state(), "train_loss": self.last_train_loss,
                "val_loss": self.last_val_loss,
            }
            save_checkpoint(self.run_dir, self.step, student, self.models.tokenizer, state)
            prune_checkpoints(self.run_dir, keep=2, current=self.step)
            if final:
                save_model(student, self.models.tokenizer, self.run_dir / "model")
        if not final:
            self._weights("train")
        self.accelerator.wait_for_everyone()

    def run(self) -> dict:
        """Train to total_steps; a Ctrl-C or SIGTERM stops after the step it lands in, saved
        (every process stops at the same step: the request is summed with the step's tokens)."""
        cfg = self.config.train
        reset_peak_memory(self.accelerator.device)
        self.step_module.train()
        self._weights("train")
        started = time.perf_counter() - self.elapsed
        with StopRequest("after this step") as stop, _progress(
                self.total_steps, self.step, enabled=cfg.progress and self.is_main) as bar:
            while self.step < self.total_steps:
                metrics = self.optimizer_step(self.micro_batches(self.step))
                self.step += 1
                fault_point(f"step-{self.step}")
                self.elapsed = time.perf_counter() - started
                self.last_train_loss = metrics["loss"]
                tokens, stops = self._reduce([self.ledger.student_tokens, float(stop.requested)])
                metrics.update(step=self.step, epoch=self.step / self.steps_per_epoch,
                               tokens=int(tokens), elapsed_s=self.elapsed,
                               tokens_per_s=tokens / max(self.elapsed, 1e-9))
                if cfg.val_every and self.step % cfg.val_every == 0:
                    self.last_val_loss = metrics["val_loss"] = self.validate()
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    self.log.write(metrics)
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
                last = self.step == self.total_steps
                if cfg.save_checkpoints and not last and (
                        stops or (cfg.save_every and self.step % cfg.save_every == 0)):
                    self.save()
                if stops and not last:
                    self._stopped(stop)
            if self.val_set and not (cfg.val_every and self.step % cfg.val_every == 0):
                self.last_val_loss = self.validate()
            if cfg.save_checkpoints:
                self.save(final=True)  # schedule-free: its evaluation weights, kept for the eval
            if self._reduce([float(stop.requested)])[0]:  # landed in the last step: no eval now
                self._stopped(stop)
        return self.summary()

    def _stopped(self, stop: StopRequest) -> None:
        """Raise Stopped once a requested stop has saved (the message: on the main process)."""
        code = self._reduce_max(stop.exit_code if stop.requested else 0)
        if not self.is_main:
            raise Stopped("", code)
        saved = self.config.train.save_checkpoints
        where = checkpoint_dir(self.run_dir, self.step) if saved else None
        raise Stopped(stop_message(self.step, self.total_steps, where), code,
                      resume=resume_command(self.run_dir))

    def summary(self) -> dict:
        totals = self.global_ledger()
        device = self.accelerator.device
        peak = self._reduce_max(peak_memory_bytes(device))
        steps = max(self.step, 1)
        s = self.config.sampling
        return {
            "run": str(self.run_dir), "steps": self.step, "epochs": self.step / self.steps_per_epoch,
            "processes": self.world, "engine": engine_name(self.accelerator),
            "truncation": self.config.data.truncation.label(),
            "train_records": len(self.train_set), "val_records": len(self.val_set),
            **totals.cost_fields(f"{s.method}@{s.fraction:g}" if s.active else "none"),
            "wall_time_s": self.elapsed, "time_per_step_s": self.elapsed / steps,
            "tokens_per_s": totals.student_tokens / max(self.elapsed, 1e-9),
            "peak_memory_bytes": peak,
            "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else "cpu_peak_rss",
            "device": str(device),
            "student_params": self.models.student_flops.total_params,
            "teacher_params": (self.models.teacher_flops.total_params
                               if self.models.teacher_flops else None),
            "teacher_ran": self.models.teacher is not None,
            "final_train_loss": self.last_train_loss, "final_val_loss": self.last_val_loss,
            "teacher_flops_cached": totals.teacher_flops_cached,
            **(self.models.teacher.summary() if self.models.teacher is not None else {}),
        }

    def finish(self) -> None:
        """After the last save: free the optimizer state, gradients, teacher and models, and
        leave the process group, so that an evaluation of any length neither runs beside them
        in memory nor keeps other processes waiting in a collective until it times out."""
        self.accelerator.wait_for_everyone()
        self.optimizer.state.clear()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_module.zero_grad(set_to_none=True)
        self.models.teacher = None
        self.accelerator.free_memory()
        self.step_module = self.optimizer = self.models = None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def _reduce_max(self, value: int) -> int:
        tensor = torch.tensor([value], dtype=torch.float64, device=self.accelerator.device)
        return int(self.accelerator.reduce(tensor, reduction="max").item())


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step",
                dynamic_ncols=True)
