"""DR-LoRA with ``transformers.Trainer`` + ``DRLoRACallback``: one script, any launcher.

    python examples/trainer.py                                          # one process
    torchrun --nproc_per_node 2 examples/trainer.py                     # DDP
    accelerate launch --multi_gpu --num_processes 2 examples/trainer.py  # DDP via accelerate
    accelerate launch --config_file examples/accelerate/fsdp2.yaml examples/trainer.py  # FSDP2 (GPUs)

By default a tiny random OLMoE and random tokens (seconds on a CPU); ``--model`` takes a local
``save_pretrained`` directory of a real MoE. The order that matters: build the model, attach
DR-LoRA, THEN create the Trainer (it wraps or shards the model, with the pools inside it, and
builds its optimizer over the pools and the routers).
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, OlmoeConfig, Trainer, TrainingArguments

import drlora_kernels as dk


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seq: int, vocab: int, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, vocab, (n, seq), generator=gen)

    def __len__(self):
        return self.ids.shape[0]

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def build_model(path: str | None):
    if path is not None:
        return AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    torch.manual_seed(0)
    config = OlmoeConfig(
        vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, num_experts=8, num_experts_per_tok=2,
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default=None, help="local model directory (default: tiny random OLMoE)"
    )
    parser.add_argument("--output-dir", default="runs/trainer")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4, help="per process")
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument(
        "--cpu", action="store_true", help="train on the CPU even if a GPU is present"
    )
    args = parser.parse_args()

    model = build_model(args.model)
    config = dk.DRLoRAConfig(r_init=2, r_target=4, r_max=8, grow_every=5, warmup_steps=3,
                             buffer_steps=3, p_grow=0.5)  # fmt: skip
    model = dk.attach_drlora(model, config)  # before the Trainer: pools get wrapped / sharded too
    vocab = model.config.vocab_size
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=args.output_dir,
            max_steps=args.steps,
            learning_rate=1e-3,
            per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=args.accumulation,
            logging_steps=5,
            save_steps=10,
            report_to="none",
            use_cpu=args.cpu or not torch.cuda.is_available(),
            ddp_find_unused_parameters=False,
        ),  # fmt: skip
        train_dataset=RandomTokens(64 * args.batch_size, 32, min(vocab, 1000)),
        callbacks=[dk.DRLoRACallback(model)],
    )
    trainer.train()
    if trainer.is_world_process_zero():
        summary = dk.get_drlora(model).controller.rank_summary()
        print(f"engine {dk.get_drlora(model).controller.engine.name}: {summary['events']} growth "
              f"events, mean rank {summary['mean']:.2f} (budget {summary['budget']})")  # fmt: skip


if __name__ == "__main__":
    main()
