"""The package's own fine-tuning loop: routers are in the optimizer, still during warmup, then train."""

from __future__ import annotations

import torch

from drlora_kernels.config import DRLoRAConfig
from drlora_kernels.train.loop import FinetuneConfig, prepare_finetune, train_step
from drlora_kernels.train.models import build_model


def test_prepare_finetune_trains_the_router_after_warmup():
    model = build_model("olmoe", "tiny", seed=0)
    cfg = FinetuneConfig(
        method="drlora", steps=6, batch_size=2, seq_len=16, lr=1e-2,
        drlora=DRLoRAConfig(r_init=2, r_target=4, r_max=8, grow_every=2, warmup_steps=2,
                            buffer_steps=1, p_grow=0.5),
    )  # fmt: skip
    handle, opt = prepare_finetune(model, cfg)
    routers = handle.router_parameters
    assert routers, "the tiny OLMoE has routers"
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in in_opt for p in routers)
    start = [p.detach().clone() for p in routers]
    gen = torch.Generator().manual_seed(0)
    changed = []
    for _ in range(cfg.steps):
        batch = torch.randint(0, 256, (2, 17), generator=gen)
        train_step(model, handle.controller, opt, batch)
        changed.append(any(not torch.equal(p, s) for p, s in zip(routers, start)))
    # steps 0 and 1 are warmup (router held still), step 2 trains it
    assert changed == [False, False, True, True, True, True]


def test_zero_parallel_refuses_rank_aware_adamw_before_touching_deepspeed():
    import pytest

    from drlora_kernels.train.distributed import DistributedRun
    from drlora_kernels.train.loop import prepare_training

    run = DistributedRun(world=2, rank=0, local_rank=0, parallel="zero2", device="cpu")
    assert run.zero_stage == 2 and DistributedRun(2, 0, 0, "ddp", "cpu").zero_stage is None
    cfg = FinetuneConfig(
        method="drlora", steps=6, batch_size=2, seq_len=16, optimizer="rank_aware_adamw",
        drlora=DRLoRAConfig(r_init=2, r_target=4, r_max=8, grow_every=2, warmup_steps=2,
                            buffer_steps=1, p_grow=0.5),
    )  # fmt: skip
    with pytest.raises(ValueError, match="--optimizer adamw"):
        prepare_training(build_model("olmoe", "tiny", seed=0), cfg, parallel=run)


def test_optimizer_defaults_to_adamw_under_zero_only():
    from drlora_kernels.cli import _optimizer, build_parser

    parse = build_parser()[0].parse_args
    assert _optimizer(parse(["train"])) == "rank_aware_adamw"
    assert _optimizer(parse(["train", "--parallel", "fsdp2"])) == "rank_aware_adamw"
    assert _optimizer(parse(["train", "--parallel", "zero2"])) == "adamw"
    assert _optimizer(parse(["train", "--parallel", "zero2", "--optimizer", "adamw"])) == "adamw"


def test_drlora_train_refuses_rank_aware_adamw_under_zero_in_one_line(capsys):
    from drlora_kernels import cli

    argv = ["train", "--parallel", "zero2", "--optimizer", "rank_aware_adamw", "--size", "tiny"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "use --optimizer adamw" in err[0], err
