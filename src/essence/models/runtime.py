"""Where models run: the accelerator (devices, precision, process group) and the weight dtypes."""

from __future__ import annotations

import datetime
from pathlib import Path

import torch

from essence.models.sharding import check_deepspeed_launch, enable_fsdp_on_cpu

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def make_accelerator(config, project_dir=None):
    """The Accelerator for a run's `train` settings (threads, precision, seed, timeout), with
    the trackers `config.tracker` names (their logs under `project_dir`, the run's folder)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, set_seed

    check_deepspeed_launch()
    if config.cpu_threads is not None:
        torch.set_num_threads(config.cpu_threads)
    precision = config.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() else "no"
    # cpu=True lets several CPU processes (torchrun / accelerate launch) form a gloo group.
    # Runs sharing one process (a sweep, the demo, tests) may differ in precision; accelerate
    # keeps the first run's in a singleton unless told to forget it (the process group stays).
    AcceleratorState._reset_state(reset_partial_state=False)
    timeout = InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=config.collective_timeout_s))
    trackers = [n for n in getattr(config, "tracker", ()) if n != "none"] if project_dir else []
    accelerator = Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available(),
                              kwargs_handlers=[timeout], log_with=trackers or None,
                              project_config=ProjectConfiguration(
                                  project_dir=str(project_dir), logging_dir=str(Path(project_dir) / "tensorboard"))
                              if trackers else None)
    enable_fsdp_on_cpu(accelerator)  # an FSDP launch on CPU processes (the CPU tests)
    set_seed(config.seed, deterministic=not torch.cuda.is_available())
    # Deterministic kernels, but without filling every new tensor (a pure cost in our loop,
    # which never reads memory it did not write).
    torch.utils.deterministic.fill_uninitialized_memory = False
    return accelerator
