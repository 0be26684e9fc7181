"""Run by tests/test_scale_out.py on two gloo processes (torch.distributed.run): the FSDP2 gather
logic of essence.models.sharding on its own. Prints "gather ok" when every check holds."""

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from essence.models.loading import random_causal_lm
from essence.models.sharding import _layer_classes, full_weight
from essence.teacher.sources import OnlineTeacher

TINY = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 2, "tie_word_embeddings": False}


class FakeAccelerator:
    is_fsdp2 = True


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    # A sharded head reassembled equals the full head; its gradient lands on the right shard,
    # averaged over processes as FSDP averages.
    head = torch.nn.Linear(6, 10, bias=False)
    full = head.weight.detach().clone()
    fully_shard(head)
    assert isinstance(head.weight, DTensor) and head.weight.to_local().shape[0] == 10 // world
    gathered = full_weight(head.weight)
    assert torch.equal(gathered, full), "the gathered head differs from the full head"
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(rank))
    (x @ gathered.T).square().sum().backward()
    reference = full.clone().requires_grad_(True)
    (x @ reference.T).square().sum().backward()
    mean = reference.grad.clone()
    dist.all_reduce(mean)
    mean /= world
    local = head.weight.grad.to_local()
    assert torch.allclose(local, mean.chunk(world)[rank], atol=1e-6), "gradient on the wrong shard"
    # The frozen teacher sharded layer by layer gives the unsharded teacher's outputs.
    from essence.models.sharding import shard_teacher

    teacher = random_causal_lm(TINY, 50, seed=1)
    plain = OnlineTeacher(random_causal_lm(TINY, 50, seed=1), torch.device("cpu"))
    assert _layer_classes(teacher), "no decoder-layer classes found"
    sharded = OnlineTeacher(shard_teacher(teacher, FakeAccelerator()), torch.device("cpu"))
    assert isinstance(teacher.lm_head.weight, DTensor), "the teacher's head is not sharded"
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    a, b = plain(ids, mask), sharded(ids, mask)
    assert torch.allclose(a.hidden, b.hidden, atol=1e-5), "sharded teacher hidden states differ"
    assert torch.equal(a.head, b.head), "sharded teacher head differs"
    print(f"gather ok rank {rank}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
