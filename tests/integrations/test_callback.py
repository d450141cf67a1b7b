"""DRLoRACallback in a real transformers.Trainer: growth, router freeze, logs, accumulation, checkpointing, resume."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer, TrainingArguments

from drlora_kernels.integrations.callback import CHECKPOINT_SUBDIR, DRLoRACallback
from drlora_kernels.integrations.checkpoint import CONFIG_NAME
from drlora_kernels.integrations.transformers import attach_drlora, get_drlora

from .tiny_models import build, small_config

SEQ, BATCH = 8, 2


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 64, seed: int = 0):
        self.ids = torch.randint(3, 128, (n, SEQ), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _args(out, **kw):
    base = dict(
        output_dir=str(out), max_steps=6, per_device_train_batch_size=BATCH, learning_rate=1e-2,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
        dataloader_num_workers=0, lr_scheduler_type="constant",
    )  # fmt: skip
    base.update(kw)
    return TrainingArguments(**base)


def _run(tmp_path, *, accumulation: int = 1, checkpointing: str | None = None, **kw):
    model = build("olmoe")
    handle = get_drlora(attach_drlora(model, small_config()))
    callback = DRLoRACallback(model)
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, gradient_accumulation_steps=accumulation, activation_checkpointing=bool(checkpointing),
                   activation_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"}, **kw),
        train_dataset=RandomTokens(),
        callbacks=[callback],
    )  # fmt: skip
    return model, handle, callback, trainer


@pytest.mark.parametrize(
    "accumulation, checkpointing",
    [(1, None), (2, None), (2, "non-reentrant"), (1, "reentrant")],
    ids=["plain", "accum2", "accum2-ckpt", "ckpt-reentrant"],
)
def test_growth_statistics_and_router_freeze(tmp_path, accumulation, checkpointing):
    model, handle, callback, trainer = _run(
        tmp_path, accumulation=accumulation, checkpointing=checkpointing
    )
    router = model.model.layers[0].mlp.gate.weight
    router_start = router.detach().clone()
    seen_tokens, router_values = [], []
    controller = (
        handle.controller
    )  # built by on_train_begin from max_steps, so wrap after train starts

    def spy_update(orig):
        def update(*a, **k):
            seen_tokens.append(handle.controller.tracker.pending_routing()[1].tolist())
            router_values.append(router.detach().clone())
            return orig(*a, **k)

        return update

    assert controller is None
    original_begin = callback.on_train_begin

    def begin(*a, **k):
        original_begin(*a, **k)
        handle.controller.update_statistics = spy_update(handle.controller.update_statistics)
        torch.testing.assert_close(router.detach(), router_start)

    callback.on_train_begin = begin
    trainer.train()
    controller = handle.controller

    # every optimizer step counted every token of every micro-batch exactly once, in both layers
    assert seen_tokens == [[float(accumulation * BATCH * SEQ)] * 2] * 6
    # the router is in the Trainer's optimizer from the start, held still for the warmup step
    # (the value before step 1 is the initial one), trained afterwards
    assert router.requires_grad
    assert torch.equal(router_values[1], router_start)
    assert not torch.equal(router_values[2], router_start)
    assert not torch.equal(router.detach(), router_start)
    assert model.is_activation_checkpointing == bool(checkpointing)
    # events at steps 1 and 3 (warmup 1, grow_every 2, floor((6 - 1) / 2) = 2 events); the last fills the budget
    assert sorted({ev.step for ev in controller.event_log}) == [1, 3]
    summary = controller.rank_summary()
    assert summary["total"] == summary["budget"]
    assert any(layer["min"] != layer["max"] for layer in summary["layers"])  # dynamic, not uniform
    # logs carry the rank statistics
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 6 and all(
        "drlora/mean_rank" in h and "drlora/layer1/max_rank" in h for h in logged
    )
    assert logged[-1]["drlora/total_rank"] == summary["total"] and logged[-1][
        "drlora/events"
    ] == len(controller.event_log)
    assert (
        logged[0]["drlora/grown_since_last_log"] == 0
        and logged[1]["drlora/grown_since_last_log"] > 0
    )


def test_checkpoint_holds_drlora_state_and_resume_continues_identically(tmp_path):
    model, handle, _, trainer = _run(tmp_path, save_strategy="steps", save_steps=2)
    trainer.train()
    ckpt = tmp_path / "checkpoint-4"
    assert (ckpt / CHECKPOINT_SUBDIR / CONFIG_NAME).is_file()
    final = {
        n: (p.lora_A.detach().clone(), p.lora_B.detach().clone(), p.ranks.clone())
        for n, p in handle.named_pools()
    }
    events = list(handle.controller.event_log)

    model2, handle2, _, trainer2 = _run(tmp_path, save_strategy="steps", save_steps=2)
    trainer2.train(
        resume_from_checkpoint=str(ckpt)
    )  # mid-growth: after the event at 3, before the one at 5
    assert handle2.controller.global_step == 6
    assert handle2.controller.event_log == events
    for name, pool in handle2.named_pools():
        a, b, r = final[name]
        assert torch.equal(pool.ranks, r), name
        torch.testing.assert_close(pool.lora_A.detach(), a, rtol=0, atol=1e-6)
        torch.testing.assert_close(pool.lora_B.detach(), b, rtol=0, atol=1e-6)


def test_resume_without_drlora_state_is_a_clear_error(tmp_path):
    _, _, _, trainer = _run(tmp_path, save_strategy="steps", save_steps=2)
    trainer.train()
    import shutil

    shutil.rmtree(tmp_path / "checkpoint-2" / CHECKPOINT_SUBDIR)
    _, _, _, trainer2 = _run(tmp_path)
    with pytest.raises(ValueError, match="holds no DR-LoRA state"):
        trainer2.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
