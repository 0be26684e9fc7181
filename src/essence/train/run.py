"""One experiment from config to summary: claim the run folder, train, save, evaluate.

``train(config, out_dir)`` is what `essence train` and every sweep point call; the optimizer
steps themselves are essence.train.loop's Trainer.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from essence.config.load import save_config
from essence.config.schema import Config
from essence.io import check_free_space, write_json_atomic
from essence.train.checkpoint import checkpoint_bytes
from essence.train.loop import Trainer
from essence.train.provenance import check_data_unchanged, record_data
from essence.train.rundir import claim_run_dir
from essence.train.setup import check_inputs

EVAL_DELAY_HOOK = "ESSENCE_TEST_EVAL_DELAY_S"
"""Test hook: seconds to wait before the end-of-run evaluation (tests of collective timeouts)."""


def train(config: Config, out_dir: str | Path, resume: bool = False,
          overwrite: bool = False, accept_changed_data: bool = False) -> dict:
    """Run one experiment into `out_dir`; returns (and writes) its summary.json.

    The folder is locked while the run writes; one holding another run's results is refused
    unless resume (continue it) or overwrite (replace it) is set. A resume on data other than
    the run recorded in RUN/data.json is refused unless accept_changed_data is set.
    A Ctrl-C or SIGTERM while training saves a checkpoint and raises essence.stopping.Stopped.
    """
    check_inputs(config)
    # Only the main process owns the folder (RANK is set by accelerate/torchrun launches).
    is_main = int(os.environ.get("RANK", "0")) == 0
    lock = claim_run_dir(out_dir, resume=resume, overwrite=overwrite) if is_main else None
    try:
        if is_main:
            record_data(Path(out_dir), config, resume, accept_changed_data)
        elif resume and not accept_changed_data:  # every process refuses, none waits for rank 0
            check_data_unchanged(out_dir, config)
        return _train(config, Path(out_dir), resume)
    finally:
        if lock is not None:
            lock.release()


def _train(config: Config, run_dir: Path, resume: bool) -> dict:
    trainer = Trainer(config, run_dir, resume)
    is_main = trainer.is_main
    log = trainer.log  # the trackers stay open for the evaluation's scores; closed on any exit
    try:
        if is_main:
            if config.train.save_checkpoints:
                check_free_space(run_dir, checkpoint_bytes(trainer.models.student), "one checkpoint")
            save_config(config, run_dir / "config.yaml")
        summary = trainer.run()
        if is_main:  # the training results land before evaluation, which may take hours or fail
            write_json_atomic(run_dir / "summary.json", summary)
        trainer.finish()
        del trainer  # the student, optimizer state and teacher go before generation starts
        if is_main and config.eval.benches:
            summary["eval"] = evaluate_run(config, run_dir)
            write_json_atomic(run_dir / "summary.json", summary)
        log.write_final(summary)
    finally:
        log.close()
    if is_main:
        print(json.dumps({k: v for k, v in summary.items() if k != "eval"}, indent=2))
    return summary


def evaluate_run(config: Config, run_dir: Path) -> dict:
    """The config's end-of-run evaluation of the saved student (main process, no process group)."""
    from essence.eval.run import evaluate_with

    delay = float(os.environ.get(EVAL_DELAY_HOOK, "0") or 0)
    if delay > 0:  # test hook: an evaluation longer than the collective timeout
        time.sleep(delay)
    return evaluate_with(
        config.eval, str(run_dir / "model"), list(config.eval.benches), run_dir / "eval",
        seed=config.train.seed, chat_template=config.data.chat_template,
    )
