"""Fine-tune with TRL's SFTTrainer while cpift's core masks keep their entries bit-identical.

The two lines marked ``# cpift`` are all a training script needs; the rest is an ordinary SFTTrainer
script. Run it alone, under ``torchrun`` (DDP), or with accelerate and FSDP2:

    accelerate launch --config_file examples/accelerate_fsdp2.yaml examples/sft_frozen_cores.py \
        --model tiny-llama --train sums.jsonl --mask cores/sums.safetensors --out sft-frozen

--train is JSONL of {"prompt": ..., "completion": ...} lines (cpift's {"prompt", "response"} lines are
accepted too). Frozen entries keep their values through AdamW (moments, weight decay) and do not count
in the clipped or logged gradient norm.
"""

from __future__ import annotations

import argparse
import json

from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from cpift.training import CoreFreezeCallback  # cpift


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--train", required=True)
    ap.add_argument("--mask", action="append", default=[], help="core-mask file; repeat for several")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=4, help="per device")
    args = ap.parse_args()

    rows = [json.loads(line) for line in open(args.train) if line.strip()]
    data = Dataset.from_list([{"prompt": r["prompt"], "completion": r.get("completion", r.get("response"))}
                              for r in rows])
    config = SFTConfig(output_dir=args.out, max_steps=args.steps, learning_rate=args.lr, weight_decay=0.1,
                       per_device_train_batch_size=args.batch_size, logging_steps=1, save_strategy="no",
                       report_to=[], use_cpu=not __import__("torch").cuda.is_available())
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(args.model), args=config, train_dataset=data,
                         processing_class=AutoTokenizer.from_pretrained(args.model),
                         callbacks=[CoreFreezeCallback(args.mask)])  # cpift
    trainer.train()
    trainer.save_model(args.out)


if __name__ == "__main__":
    main()
