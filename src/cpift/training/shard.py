"""Data parallelism of ``sft``: the process group, DDP or FSDP2 wrapping, and what changes with them.

DDP keeps a whole copy of the model, gradients and AdamW state on every rank and all-reduces the
gradients. FSDP2 (``fully_shard``, ``--fsdp``) shards each parameter on dim 0 over the ranks, so
weights, gradients and AdamW state take 1/world of the memory each: each decoder block (the
classes a Hugging Face model lists in ``_no_split_modules``) is one unit, gathered just before its
forward and backward and freed after, and the root holds the rest (embeddings, final norm, head).
On CUDA a bf16 ``MixedPrecisionPolicy`` computes in bf16 and reduces gradients in float32; the
sharded master weights stay float32. Both average gradients over the ranks, so ``sft``'s loss
scaling (× world / the global batch's target count) is the same for both.

The full state dict is gathered to rank 0 (on the CPU) for saving; the other ranks get nothing.
``--fsdp`` outside torchrun runs a world of one (a one-rank process group of its own).
"""

from __future__ import annotations

import contextlib
import os

import torch

from cpift.errors import ParameterError
from cpift.numbers import env_int


def dist_env() -> tuple[int, int, int]:
    """(world size, rank, local rank) from torchrun's environment; (1, 0, 0) outside it.

    Raises:
        ParameterError: a malformed value, a rank outside the world, or WORLD_SIZE > 1 without the
            rendezvous address torchrun sets (init_process_group would wait for ever).
    """
    world = env_int("WORLD_SIZE", 1, lo=1, hi=2**20, error=ParameterError)
    rank = env_int("RANK", 0, lo=0, hi=world - 1, error=ParameterError)
    local_rank = env_int("LOCAL_RANK", 0, lo=0, hi=world - 1, error=ParameterError)
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if world > 1 and not os.environ.get(v)]
    if missing:
        raise ParameterError(f"environment variable WORLD_SIZE: {world} processes, but {missing[0]} is unset; "
                             f"start the run with torchrun, or unset WORLD_SIZE for one process")
    return world, rank, local_rank


def init_group(dev: torch.device, world: int) -> bool:
    """Start the process group unless one runs already (NCCL on CUDA, gloo on the CPU); True if started here.

    A world of one (``--fsdp`` without torchrun) gets a process group of its own over an in-memory store.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if world == 1 and "MASTER_ADDR" not in os.environ:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    else:
        dist.init_process_group(backend=backend)
    return True


def check_wrapping(fsdp: bool, net: torch.nn.Module) -> None:
    """Refuse ``--fsdp`` for a model without decoder blocks to shard (it names none in _no_split_modules)."""
    if fsdp and not block_classes(net):
        raise ParameterError(f"--fsdp: {type(net).__name__} names no decoder block class (_no_split_modules) to "
                             f"shard; train it without --fsdp")


def block_classes(net: torch.nn.Module) -> set[str]:
    return set(getattr(net, "_no_split_modules", None) or [])


def wrap(net: torch.nn.Module, dev: torch.device, *, world: int, fsdp: bool,
         activation_checkpointing: bool) -> torch.nn.Module:
    """The module to call in the loop: ``net`` (sharded in place under FSDP2), DDP-wrapped, or as is."""
    if activation_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(net, "activation_checkpointing_enable"):  # transformers >= 5.25 names it so
            net.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            net.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(dev.type, (world,))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if dev.type == "cuda" else MixedPrecisionPolicy()
        blocks = block_classes(net)
        for module in list(net.modules()):
            if type(module).__name__ in blocks:
                fully_shard(module, mesh=mesh, mp_policy=mp)
        fully_shard(net, mesh=mesh, mp_policy=mp)
        return net
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # gradient_as_bucket_view: the gradients live in DDP's buckets, not in a second copy (4 B/parameter less)
        return DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None,
                                       gradient_as_bucket_view=True)
    return net


def no_sync(model: torch.nn.Module, sync: bool):
    """Skip the gradient reduction of a micro-batch that is not the step's last (DDP and FSDP2)."""
    if sync:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):
        return model.no_sync()
    return _fsdp_no_sync(model)


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def full_value(t) -> float:
    """A scalar tensor's value; a DTensor (FSDP2's clip norm) is made whole first."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return float(t)


def rank_sum(value: int, dev: torch.device, world: int) -> int:
    """``value`` summed over the ranks (a count each rank holds for its own shards)."""
    if world == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64, device=dev)
    dist.all_reduce(t)
    return int(t.item())


def first_nonfinite(net: torch.nn.Module, world: int) -> str | None:
    """The name of a parameter holding NaN or Inf on any rank (each rank checks its own shards), or None."""
    from .freeze import local

    names = [n for n, _ in net.named_parameters()]
    bad = torch.tensor([not bool(torch.isfinite(local(p.detach())).all()) for _, p in net.named_parameters()],
                       dtype=torch.int32)
    if world > 1:
        import torch.distributed as dist

        dev = next(net.parameters()).device
        on = bad.to(dev)
        dist.all_reduce(on, op=dist.ReduceOp.MAX)
        bad = on.cpu()
    hit = bad.nonzero()
    return names[int(hit[0])] if hit.numel() else None


def gather_for_saving(net: torch.nn.Module, rank: int) -> torch.nn.Module | None:
    """An unsharded copy of an FSDP2 model on rank 0's CPU (None on the other ranks); every rank must call."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return None
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(net.config, dtype=torch.float32)
    plain.load_state_dict(state, assign=True, strict=False)
    plain.tie_weights()
    missing = [n for n, p in plain.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"gathered state dict lacks {missing[:3]}")
    return plain
