"""Our pieces under sharded engines (FSDP2, DeepSpeed ZeRO-3); accelerate does the sharding.

The fused loss reads the student's LM-head weight directly instead of calling the head module,
so a sharding engine that gathers a module's weights only around that module's own forward
would hand it a shard (FSDP2: a DTensor; ZeRO-3: an empty placeholder). essence avoids that:

- FSDP2: the prepared module is the ``DistillStep``; each decoder layer is its own unit and the
  embeddings, final norm and LM head stay in the root unit, which FSDP2 gathers before the step's
  forward and keeps until backward, so the loss reads one full head and its gradient is
  reduce-scattered back to the shards by FSDP itself. Should a head still arrive sharded (a
  config that gives it its own unit), ``full_weight`` gathers it, and its gradient, averaged
  over processes as FSDP averages, goes back to this process's shard.
- ZeRO-3 (unverified: deepspeed is not installed where essence is tested): the head is
  registered as an external parameter of the step module, DeepSpeed's mechanism for a weight
  used outside its own module's forward (as tied embeddings are).
- The frozen teacher is sharded layer by layer too (``shard_teacher``); its head is gathered for
  each micro-batch and freed with the loss.
- Checkpoints are ordinary Hugging Face models: ``full_model_state`` gathers the full state dict
  onto the main process, ``full_optimizer_state``/``load_optimizer_state`` do the same for AdamW.
"""

from __future__ import annotations

import os

import torch


def is_fsdp2(accelerator) -> bool:
    return bool(getattr(accelerator, "is_fsdp2", False))


def is_zero3(accelerator) -> bool:
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return False
    plugin = accelerator.state.deepspeed_plugin
    return plugin is not None and plugin.zero_stage == 3


def engine_name(accelerator) -> str:
    """How the run's processes share the work: fsdp2, deepspeed_zero<stage>, ddp or single."""
    from accelerate.utils import DistributedType

    if is_fsdp2(accelerator):
        return "fsdp2"
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return f"deepspeed_zero{accelerator.state.deepspeed_plugin.zero_stage}"
    return "ddp" if accelerator.num_processes > 1 else "single"


def check_deepspeed_launch() -> None:
    """A DeepSpeed launch: refused on CPU (accelerate would quietly train with DDP there), and
    said to be unverified on GPUs (no essence test has run it end to end)."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return
    from essence.errors import EssenceError

    if not torch.cuda.is_available():
        raise EssenceError(
            "a DeepSpeed launch (accelerate config distributed_type: DEEPSPEED) on CPU: essence "
            "runs DeepSpeed only on GPUs, where it is unverified; shard on CPU with "
            "configs/accelerate/fsdp2.yaml")
    if int(os.environ.get("RANK", "0")) == 0:
        print("essence: DeepSpeed ZeRO-3 is UNVERIFIED in essence (no test has trained, saved and "
              "resumed under it); configs/accelerate/fsdp2.yaml is the tested sharded path")


def enable_fsdp_on_cpu(accelerator) -> None:
    """Honour an FSDP launch on CPU processes (gloo).

    accelerate (1.15) turns its FSDP plugin on only for GPU-like process groups and otherwise
    trains CPU processes with DDP without a word; torch's fully_shard runs on gloo, so this
    switches the state to FSDP as accelerate does on GPUs. It is how the CPU tests exercise the
    sharded path; on GPUs it does nothing.
    """
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if (os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true"
            or accelerator.distributed_type != DistributedType.MULTI_CPU):
        return
    plugin = FullyShardedDataParallelPlugin()
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    from accelerate.state import PartialState

    # Both singletons: a later AcceleratorState() refreshes itself from PartialState's copy.
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin


def full_weight(weight: torch.Tensor) -> torch.Tensor:
    """The whole of a possibly FSDP-sharded weight, differentiable back to this process's shard.

    A plain tensor (unsharded, or gathered by FSDP for the running forward) is returned as is.
    A DTensor sharded over processes is all-gathered; in backward each process's gradient of the
    full weight is averaged over processes (as FSDP averages gradients) and reduce-scattered, so
    every shard receives its rows of the mean gradient. Only one full copy exists at a time.
    """
    from torch.distributed.tensor import DTensor, Partial

    if not isinstance(weight, DTensor):
        return weight
    return weight.full_tensor(grad_placements=[Partial("avg")])


def register_head(accelerator, step_module: torch.nn.Module) -> None:
    """Under ZeRO-3, have DeepSpeed gather the student's LM head for the step's forward (the
    fused loss reads it there, not in the head module's own forward) and partition its gradient."""
    if not is_zero3(accelerator):
        return
    import deepspeed

    inner = getattr(step_module, "module", step_module)
    head = inner.student.get_output_embeddings().weight
    deepspeed.zero.register_external_parameter(inner, head)


def _layer_classes(model: torch.nn.Module) -> tuple[type, ...]:
    """The decoder-layer classes of a transformers model (its _no_split_modules)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return tuple({type(m) for m in model.modules() if type(m).__name__ in names})


def shard_teacher(model: torch.nn.Module, accelerator) -> torch.nn.Module:
    """Shard a frozen teacher over the processes with FSDP2 (no-op unless the run uses FSDP2).

    Each decoder layer, then the body (embeddings and final norm), then the rest (an untied LM
    head) is one unit, resharded after every forward: a process holds 1/N of the teacher plus one
    layer at a time. Teacher weights stay in their own dtype (no mixed-precision cast).
    """
    if not is_fsdp2(accelerator):
        return model
    from torch.distributed.fsdp import fully_shard

    layers = _layer_classes(model)
    assert layers, f"{type(model).__name__} declares no decoder-layer classes (_no_split_modules)"
    for module in list(model.modules()):
        if isinstance(module, layers):
            fully_shard(module, reshard_after_forward=True)
    body = model.get_decoder()
    fully_shard(body, reshard_after_forward=True)
    body_params = {id(p) for p in body.parameters()}
    if any(id(p) not in body_params for p in model.parameters()):  # an untied LM head
        fully_shard(model, reshard_after_forward=True)
    return model


def full_model_state(accelerator, step_module: torch.nn.Module, prefix: str = "student.") -> dict | None:
    """The student's full state dict (CPU tensors) on the main process, None on the others;
    every process must call it under FSDP2. Without sharding: None (save the model as it is)."""
    if not is_fsdp2(accelerator):
        return None
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    state = get_model_state_dict(step_module, options=StateDictOptions(full_state_dict=True,
                                                                      cpu_offload=True))
    if not accelerator.is_main_process:
        return None
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def full_optimizer_state(accelerator, step_module: torch.nn.Module, optimizer) -> dict:
    """The optimizer's state dict, whole (gathered over processes under FSDP2); call everywhere."""
    if not is_fsdp2(accelerator):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    return get_optimizer_state_dict(step_module, inner, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True))


def load_optimizer_state(accelerator, step_module: torch.nn.Module, optimizer, state: dict) -> None:
    """Load what full_optimizer_state returned (each process keeps its shard under FSDP2)."""
    if not is_fsdp2(accelerator):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    inner = getattr(optimizer, "optimizer", optimizer)
    set_optimizer_state_dict(step_module, inner, state,
                             options=StateDictOptions(full_state_dict=True))
