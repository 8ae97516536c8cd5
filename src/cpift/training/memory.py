"""Per-rank memory of full fine-tuning with AdamW, under DDP and FSDP2, and of cpift's freeze state.

Per parameter, with float32 master weights (what ``sft`` keeps; bf16 autocast or FSDP2's bf16
``MixedPrecisionPolicy`` compute in bf16 but update float32 weights):

    weights 4 B, gradients 4 B, AdamW exp_avg + exp_avg_sq 8 B: 16 B per parameter,
    freeze state 12 B per frozen entry (an int64 index and the float32 value, training/freeze.py).

DDP keeps all of it on every rank (its gradient buckets are the gradients themselves:
``gradient_as_bucket_view``); FSDP2 shards all of it, freeze state included, over the world.
A step's peak adds AdamW's temporaries: the multi-tensor (foreach) step computes sqrt(exp_avg_sq)
for all of the rank's parameters at once, 4 B per parameter more (``RankMemory.peak``).
Not counted: activations (batch × length × width × layers; ``--activation-checkpointing`` keeps
one block's), FSDP2's transient all-gathered block (one or two decoder blocks at once, in the
compute dtype), the CUDA context and allocator slack. benchmarks/memory_per_rank.py checks the
formula against the peak RSS of CPU runs.
"""

from __future__ import annotations

from dataclasses import dataclass

WEIGHT, GRAD, ADAM, FROZEN_ENTRY = 4, 4, 8, 12  # bytes per parameter (per frozen entry for the last)

# Parameter counts of the models the README's table is for.
MODELS = {"1B (Llama-3.2-1B)": 1_235_814_400, "7B (LLaMA-2-7B)": 6_738_415_616,
          "70B (LLaMA-2-70B)": 68_976_648_192}


@dataclass(frozen=True)
class RankMemory:
    """Bytes one rank holds for the model's training state."""

    weights: int
    grads: int
    adam: int
    freeze: int
    step_temp: int = 0  # AdamW's foreach temporaries during the step

    @property
    def total(self) -> int:
        """The state held between steps."""
        return self.weights + self.grads + self.adam + self.freeze

    @property
    def peak(self) -> int:
        """The state plus the optimizer step's temporaries."""
        return self.total + self.step_temp


def _shard(n: int, world: int) -> int:
    """The largest rank's share of n entries split over the world (FSDP2 pads the last shard)."""
    return -(-n // world)


def rank_memory(params: int, *, world: int = 1, fsdp: bool = False, frozen: int = 0) -> RankMemory:
    """Per-rank bytes of weights, gradients, AdamW state and freeze state for full fine-tuning.

    Args:
        params: the model's parameter count.
        world: number of ranks.
        fsdp: FSDP2 (everything sharded over ``world``); else DDP (everything replicated).
        frozen: frozen entries (cores of earlier stages), held as index + value.

    Returns:
        RankMemory in bytes.

    Example:
        >>> rank_memory(6_738_415_616, world=8, fsdp=True).total / 1e9  # LLaMA-2-7B, 8 ranks
        13.476831232
    """
    if params < 0 or world < 1 or not 0 <= frozen <= params:
        raise ValueError(f"rank_memory: params={params}, world={world}, frozen={frozen} out of range")
    n = _shard(params, world) if fsdp else params
    f = _shard(frozen, world) if fsdp else frozen
    return RankMemory(WEIGHT * n, GRAD * n, ADAM * n, FROZEN_ENTRY * f, step_temp=WEIGHT * n)


def memory_table(models: dict[str, int] | None = None, *, worlds: tuple[int, ...] = (1, 2, 8),
                 frozen_share: float = 0.04) -> str:
    """A Markdown table of per-rank GB (1e9 bytes) for each model, scheme and world size."""
    rows = [f"| model | scheme | world | weights | grads | AdamW | freeze ({frozen_share:.0%} frozen) | total |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, params in (models or MODELS).items():
        for fsdp in (False, True):
            for world in worlds:
                m = rank_memory(params, world=world, fsdp=fsdp, frozen=int(frozen_share * params))
                cells = " | ".join(f"{v / 1e9:.1f}" for v in (m.weights, m.grads, m.adam, m.freeze, m.total))
                rows.append(f"| {name} | {'FSDP2' if fsdp else 'DDP'} | {world} | {cells} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(memory_table())
