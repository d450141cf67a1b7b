"""The quality study (v2): its plan, LR choice, variants, splits, report and a tiny end-to-end run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from drlora_kernels import quality
from drlora_kernels.cli import build_parser, main
from drlora_kernels.config import DRLoRAConfig
from drlora_kernels.pool import lora_scale
from drlora_kernels.scheduler import GrowthSchedule
from drlora_kernels.train import data


def parse(*argv: str):
    parser, _ = build_parser()
    return parser.parse_args(["quality", *argv])


@pytest.mark.parametrize(
    "steps,expected", [(600, (18, 52, 52)), (200, (6, 17, 17)), (1000, (30, 88, 88))]
)
def test_paper_schedule_has_the_papers_proportions(steps, expected):
    s = quality.paper_schedule(steps)
    assert (s["warmup_steps"], s["grow_every"], s["buffer_steps"]) == expected
    sched = GrowthSchedule(steps, 16, 4, 8, 16, p_grow=0.25, **s)
    assert sched.num_events == 10  # ~10 events, warmup 3%, buffer ~1/10 of the growth span
    span = sched.t_end - sched.warmup_steps
    assert 0.08 <= s["buffer_steps"] / span <= 0.12
    with pytest.raises(ValueError, match="too few"):
        quality.paper_schedule(9)


def test_default_plan_fits_the_compute_plan():
    plan = quality.build_plan(parse())
    sweep = [k for k in plan if k.phase == "sweep"]
    assert plan[: len(sweep)] == sweep  # sweeps first
    # then seed by seed over every grid: a study stopped early has every cell at the first seeds
    assert [k.seed for k in plan[len(sweep) :]] == sorted(k.seed for k in plan[len(sweep) :])
    assert {(k.arch, k.corpus, k.seed) for k in sweep} == {("olmoe", "mixed", 0)}
    assert sweep[0].steps == 200  # the short sweep first: its evidence comes early
    # Allocation ablations take DR-LoRA's LR: only the allocation differs.
    assert {k.variant for k in sweep if k.steps == 600} == {
        "lora-rinit", "lora", "lora-2x", "drlora", "drlora-until",
    }  # fmt: skip
    assert {k.variant for k in sweep if k.steps == 200} == {"lora", "drlora", "drlora-until"}
    main600 = [k for k in plan if k.phase == "main" and k.steps == 600]
    assert len(main600) == 3 * 3 * 3 * 3  # archs x corpora x seeds x variants
    assert {k.arch for k in plan if k.phase == "main" and k.steps == 200} == {"olmoe"}
    ablation = [k for k in plan if k.phase == "ablation"]
    assert {k.arch for k in ablation} == {"olmoe"} and len(ablation) == 3 * 3 * 4
    assert quality.count_runs(plan) == 168


def test_best_lr_is_chosen_on_validation_and_shared_by_allocation_ablations():
    def rec(variant, lr, val, test, phase="sweep"):
        return dict(phase=phase, steps=600, variant=variant, lr=lr, val_loss=val, test_loss=test)

    records = [
        rec("lora", 3e-3, 2.0, 1.0),  # the best test loss, but not the best validation loss
        rec("lora", 1e-2, 1.9, 2.0),
        rec("drlora", 6e-3, 1.8, 1.8),
        rec("drlora", 2e-2, 1.85, 1.7),
        rec("lora", 2e-2, 1.0, 1.0, phase="main"),  # not a sweep run
    ]
    best = quality.best_lrs(records)
    assert best[(600, "lora")] == 1e-2 and best[(600, "drlora")] == 6e-3
    assert best[(600, "random")] == best[(600, "global")] == 6e-3


def test_variant_configs_share_the_scale_and_the_schedule():
    base = DRLoRAConfig(r_init=4, r_target=8, r_max=16, p_grow=0.25, seed=3)
    configs = {v: quality.variant_config(v, base, 600, grow_until=0.25) for v in quality.VARIANTS}
    for name, (_, cfg) in configs.items():
        assert lora_scale(cfg.alpha, cfg.r_target, cfg.scaling) == 2.0, name  # alpha = 2 r
        assert (cfg.warmup_steps, cfg.grow_every, cfg.buffer_steps) == (18, 52, 52)
        assert cfg.seed == 3
    assert {v: (m, c.r_init, c.r_max) for v, (m, c) in configs.items() if m == "lora"} == {
        "lora-rinit": ("lora", 4, 4), "lora": ("lora", 8, 8), "lora-2x": ("lora", 16, 16),
    }  # fmt: skip
    assert configs["drlora"][1].grow_until is None
    assert configs["drlora-until"][1].grow_until == 0.25
    assert configs["global"][1].allocation == "global"
    with pytest.raises(ValueError, match="variant"):
        quality.variant_config("nope", base, 600, grow_until=0.25)


def test_time_averaged_rank():
    # 2 modules from rank 4; +4 total after the backward of step 2 (used from step 3 on),
    # +4 after step 6: 3 steps at 4, 4 steps at 6, 3 steps at 8 over 10 steps.
    ev = [{"old_rank": 4, "new_rank": 8}]
    record = {"growth_events": [{"step": 3, "events": ev}, {"step": 7, "events": ev}]}
    assert quality.time_averaged_rank(record, 4, 2, 10) == pytest.approx(
        (3 * 4 + 4 * 6 + 3 * 8) / 10
    )
    assert quality.time_averaged_rank({"growth_events": []}, 8, 2, 10) == 8


def test_splits_are_disjoint_and_large_enough():
    noise = torch.randint(0, 256, (200_000,), generator=torch.Generator().manual_seed(0))
    corpus = data.Corpus("noise", "test", ("noise",), (bytes(noise.to(torch.uint8).tolist()),))
    s = quality.make_splits(corpus, 32, val_blocks=64, test_blocks=256)
    assert s.val.shape == (64, 33) and s.test.shape == (256, 33)
    rows = lambda t: {tuple(r) for r in t.tolist()}  # noqa: E731
    assert not rows(s.val) & rows(s.test) and not rows(s.train) & rows(s.test)
    with pytest.raises(ValueError, match="too few"):
        quality.make_splits(corpus, 32, val_blocks=4000, test_blocks=4000)


def test_mixed_corpus_interleaves_kinds_of_text():
    corpus = data.load_corpus("mixed", max_bytes=700_000)
    parts = data.MIXTURES["mixed"][1]
    assert corpus.source.count(":") == len(parts)
    # Round-robin: the first documents come from every part in turn.
    first = [f for f in corpus.files[: len(parts)]]
    assert len({f.rsplit("/", 2)[-2] for f in first}) > 3
    assert "mixed" in data.corpus_names()


def test_report_tables_pairs_and_wins():
    records = []
    for seed, (lo, dr) in enumerate([(2.0, 1.9), (2.1, 2.15), (2.2, 2.1)]):
        for variant, loss in (("lora", lo), ("drlora", dr)):
            records.append(dict(
                phase="main", steps=600, arch="olmoe", corpus="mixed", seed=seed, variant=variant,
                lr=1e-2, val_loss=loss, test_loss=loss, wall_seconds=60.0, time_averaged_rank=8.0,
            ))  # fmt: skip
    records += [
        dict(r, phase="sweep", seed=0, lr=lr, val_loss=r["val_loss"] + d, ident=None)
        for r in records[:2] for lr, d in ((3e-3, 0.5), (1e-2, 0.0))
    ]  # fmt: skip
    text = quality.summarize(records)
    # drlora - lora: -0.1, +0.05, -0.1 -> mean -0.05, 2 wins of 3
    assert "| olmoe | mixed | 2.1000 ± 0.1000 | 2.0500 ± 0.1323 | -0.0500 ± 0.0866 (2/3) |" in text
    assert "| 600 | lora | 2.5000 | **2.0000** |" in text
    assert "Wall time per run" in text


def test_quality_study_end_to_end_resumes_and_reports(tmp_path, one_thread, monkeypatch):
    out = tmp_path / "q"
    argv = ["quality", "--archs", "olmoe", "--corpora", "licenses", "--sweep-corpus", "licenses",
            "--seeds", "0", "1",
            "--steps", "12", "--lrs", "1e-2", "3e-2", "--ablation-variants", "random",
            "--size", "tiny", "--pretrain-steps", "2", "--batch-size", "2", "--seq-len", "32",
            "--corpus-bytes", "150000", "--val-blocks", "16", "--test-blocks", "32",
            "--r-init", "2", "--r-target", "4", "--r-max", "8", "--events", "2",
            "--grow-until", "0.5", "--output-dir", str(out), "--no-progress", "--threads", "1"]  # fmt: skip
    assert main(argv) == 0
    records = quality.load_records(out)
    # sweep: 3 variants x 2 LRs; main: 3 more at seed 1; ablation: random at seeds 0 and 1
    assert len(records) == 6 + 3 + 2
    assert len({r["ident"] for r in records}) == len(records)
    for r in records:
        assert math.isfinite(r["test_loss"]) and math.isfinite(r["val_loss"])
        assert r["router_change"] > 0, r["variant"]  # the routers train for every method
        assert r["wall_seconds"] > 0
    dr = [r for r in records if r["variant"] == "drlora" and r["phase"] == "sweep"]
    assert all(r["events"] == 2 and r["rank_mean"] == 4.0 for r in dr)
    until = [r for r in records if r["variant"] == "drlora-until"]
    assert all(r["schedule"]["grow_until"] == 0.5 for r in until)
    lora = [r for r in records if r["variant"] == "lora"]
    assert all(r["time_averaged_rank"] == 4.0 and r["events"] == 0 for r in lora)
    best = quality.best_lrs(records)
    assert {r["lr"] for r in records if r["variant"] == "random"} == {best[(12, "drlora")]}
    report = (out / "quality.md").read_text()
    assert "Finished runs: 11 of 11" in report and "| olmoe | licenses |" in report

    # Restart: nothing runs again.
    def no_run(self, key, lr):
        raise AssertionError(f"ran {key} again")

    monkeypatch.setattr(quality.Study, "run", no_run)
    assert main(argv) == 0
    assert len(quality.load_records(out)) == 11
    # Other settings in the same directory: refused, nothing appended.
    assert main([*argv, "--batch-size", "4"]) == 2
    # --report renders from the records alone.
    (out / "quality.md").unlink()
    assert main(["quality", "--report", str(out)]) == 0
    assert (out / "quality.md").read_text() == report
    # A settings file from before a flag existed implies the flag's default.
    settings = json.loads((out / "settings.json").read_text())
    del settings["new_slot_lr_scale"]
    (out / "settings.json").write_text(json.dumps(settings))
    assert main(argv) == 0


def test_quality_rejects_bad_flags(tmp_path, capsys):
    base = ["quality", "--output-dir", str(tmp_path / "x"), "--dry-run"]
    assert main([*base, "--archs", "gpt2"]) == 2
    assert "gpt2" in capsys.readouterr().err
    assert main([*base, "--corpora", "nope"]) == 2
    assert main([*base, "--main-variants", "drlora"]) == 2
    assert main([*base, "--steps", "9"]) == 2
    assert main(["quality", "--report", str(tmp_path)]) == 2
    assert main([*base]) == 0
    assert not (tmp_path / "x").exists()  # a dry run writes nothing


def test_random_allocation_replaces_the_saliency():
    class Tracker:
        def saliency(self, ranks):
            return torch.zeros(ranks.shape[0], ranks.shape[1] * ranks.shape[2])

    class Handle:
        controller = type("C", (), {"tracker": Tracker()})()

    h = Handle()
    quality.use_random_allocation(h, seed=1)
    a = h.controller.tracker.saliency(torch.zeros(2, 2, 4))
    b = h.controller.tracker.saliency(torch.zeros(2, 2, 4))
    assert a.shape == (2, 8) and not torch.equal(a, b) and (a > 0).all()
    h2 = Handle()
    quality.use_random_allocation(h2, seed=1)
    assert torch.equal(h2.controller.tracker.saliency(torch.zeros(2, 2, 4)), a)  # seeded
    assert json.dumps(quality.VARIANTS)
