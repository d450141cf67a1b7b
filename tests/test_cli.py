"""The ``drlora`` CLI and the demo pipeline, end to end on a tiny setting (seconds, CPU).

The tiny demo pre-trains a ~50 k-parameter OLMoE-style model for a few steps and
fine-tunes it three ways; the tests check what the run leaves behind, the
budget and masked-path invariants, and that the same seed gives the same run.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from drlora_kernels.cli import _apply_config_file, _read_config_file, build_parser, main
from drlora_kernels.layers import GroupedLoRALinear
from drlora_kernels.ops import route_tokens
from drlora_kernels.train import data
from drlora_kernels.train.masked import MaskedGroupedLoRALinear, use_masked_compute
from drlora_kernels.train.pipeline import demo_spec

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run_demo(run_dir: Path, seed: int = 0) -> dict:
    rc = main(
        [
            "demo",
            "--tiny",
            "--run-dir",
            str(run_dir),
            "--no-progress",
            "--threads",
            "1",
            "--seed",
            str(seed),
        ]
    )
    assert rc == 0
    return json.loads((run_dir / "results.json").read_text())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, dict]:
    before = torch.get_num_threads()
    run_dir = tmp_path_factory.mktemp("demo")
    try:
        return run_dir, _run_demo(run_dir)
    finally:
        torch.set_num_threads(before)


def test_demo_writes_results_and_plots(tiny_run):
    run_dir, res = tiny_run
    assert set(res["methods"]) == {"lora", "drlora", "masked"}
    spec = demo_spec(tiny=True)
    for name, rec in res["methods"].items():
        assert math.isfinite(rec["eval_loss"]) and rec["perplexity"] == pytest.approx(
            math.exp(rec["eval_loss"])
        )
        assert rec["eval_curve"][0][0] == 0 and rec["eval_curve"][-1][0] == spec.finetune.steps
        assert [s for s, _ in rec["train_curve"]] == list(range(1, spec.finetune.steps + 1))
        assert rec["tokens_per_second"] > 0 and rec["peak_memory_bytes"] > 0, name
        # tokens/s comes from the interleaved timing; the training-time figure is kept
        tokens_per_step = spec.finetune.batch_size * spec.finetune.seq_len
        assert rec["tokens_per_second"] == pytest.approx(
            tokens_per_step / rec["step_seconds_interleaved"]
        )
        assert rec["tokens_per_second_train"] > 0
    for png in ("loss_curves.png", "ranks_heatmap.png"):
        assert (run_dir / png).read_bytes()[:8] == PNG_MAGIC
    summary = (run_dir / "summary.txt").read_text()
    assert summary.startswith("method")
    # the table states its settings: the study's LR and schedule (grow_until)
    assert f"lr {spec.finetune.lr:g}" in summary and "grow_until 0.25" in summary
    for method in res["methods"]:
        assert (run_dir / "adapters" / method / "drlora_config.json").is_file()
    pre = res["pretraining"]
    assert pre["cached"] is False and math.isfinite(pre["eval_loss"])


def test_demo_same_rank_budget(tiny_run):
    _, res = tiny_run
    r_target = demo_spec(tiny=True).finetune.drlora.r_target
    lora, dyn = res["methods"]["lora"]["rank_stats"], res["methods"]["drlora"]["rank_stats"]
    assert {r for layer in lora["ranks"] for pool in layer for r in pool} == {r_target}
    # Every layer ends with exactly M * r_target ranks (SPEC Eq. 4), and growth made them uneven.
    assert dyn["per_layer_total"] == lora["per_layer_total"]
    assert dyn["max"] > r_target > dyn["min"] or dyn["std"] > 0
    assert res["methods"]["drlora"]["growth_events"], "the tiny schedule must have growth events"


def test_demo_masked_path_matches_variable_rank(tiny_run):
    _, res = tiny_run
    checks = res["checks"]
    assert checks["masked_vs_drlora_max_abs_logit_diff"] < 1e-4
    assert checks["masked_same_final_ranks"] and checks["masked_same_growth_decisions"]
    assert checks["masked_vs_drlora_eval_loss_diff"] < 1e-4


def test_demo_reuses_pretrained_checkpoint_and_is_reproducible(tiny_run, tmp_path, one_thread):
    run_dir, first = tiny_run
    again = _run_demo(tmp_path / "again")  # pre-trains again from scratch in a new directory
    for name, rec in first["methods"].items():
        other = again["methods"][name]
        assert other["train_curve"] == rec["train_curve"], name
        assert other["eval_curve"] == rec["eval_curve"], name
        assert other["rank_stats"]["ranks"] == rec["rank_stats"]["ranks"], name
    cached = _run_demo(run_dir)
    assert cached["pretraining"]["cached"] is True
    assert cached["methods"]["drlora"]["eval_curve"] == first["methods"]["drlora"]["eval_curve"]


def test_demo_other_seed_differs(tmp_path, one_thread):
    spec0, spec1 = demo_spec(tiny=True, seed=0), demo_spec(tiny=True, seed=1)
    assert (
        spec0.finetune.seed != spec1.finetune.seed
        and spec0.finetune.drlora.seed != spec1.finetune.drlora.seed
    )
    blocks = data.make_blocks(data.load_corpus("licenses", max_bytes=100_000), 32)
    b0 = next(data.train_batches(blocks.train, 4, 1, seed=0))
    b1 = next(data.train_batches(blocks.train, 4, 1, seed=1))
    assert not torch.equal(b0, b1)


# ---------------------------------------------------------------- masked computation


def test_masked_pool_equals_variable_rank_pool():
    E, K, N, R = 5, 24, 20, 8
    gen = torch.Generator().manual_seed(3)
    pool = GroupedLoRALinear(E, K, N, R, 2, r_target=4, generator=gen)
    with torch.no_grad():
        pool.lora_B.normal_(generator=gen)  # non-zero B so the LoRA path shows
    pool.grow([0, 3], [6, 1], generator=gen)
    pool.ranks[4] = 0  # an expert with rank 0
    masked = GroupedLoRALinear(E, K, N, R, 2, r_target=4)
    masked.load_state_dict(pool.state_dict())
    assert use_masked_compute([[masked]]) == 1 and isinstance(masked, MaskedGroupedLoRALinear)

    idx = torch.randint(0, E, (40, 2), generator=gen)
    routing = route_tokens(idx, torch.rand(40, 2, generator=gen), E)
    x = torch.randn(80, K, generator=gen)
    w = torch.randn(E, N, K, generator=gen)
    grad = torch.randn(80, N, generator=gen)
    outs = []
    for p in (pool, masked):
        p.zero_grad()
        y = p(x, routing.offsets, w)
        y.backward(grad)
        outs.append((y.detach(), p.lora_A.grad.clone(), p.lora_B.grad.clone()))
    (y0, ga0, gb0), (y1, ga1, gb1) = outs
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ga1, ga0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb1, gb0, rtol=1e-5, atol=1e-5)
    inactive = ~pool.active_mask()
    assert ga1[inactive].abs().max() == 0 and gb1.transpose(1, 2)[inactive].abs().max() == 0


# ---------------------------------------------------------------- data


def test_blocks_split_and_batches_are_deterministic():
    corpus = data.Corpus("t", "test", ("a", "b"), (b"hello world " * 40, b"second doc " * 40))
    blocks = data.make_blocks(corpus, 15, eval_every=4)
    assert blocks.train.shape[1] == blocks.eval.shape[1] == 16
    assert blocks.train.shape[0] + blocks.eval.shape[0] == (480 + 440 + 2) // 16
    assert (blocks.train == data.EOS_ID).sum() + (blocks.eval == data.EOS_ID).sum() >= 1
    a = list(data.train_batches(blocks.train, 3, 7, seed=5))
    b = list(data.train_batches(blocks.train, 3, 7, seed=5))
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == 7
    assert data.decode(data.encode("héllo")) == "héllo"


def test_bad_corpus_and_data_paths_raise():
    with pytest.raises(ValueError, match="corpus must be one of"):
        data.load_corpus("nope")
    with pytest.raises(ValueError, match="does not exist"):
        data.load_text_files(["/definitely/not/here"])


# ---------------------------------------------------------------- argument parsing


def test_train_config_file_sets_defaults_and_flags_win(tmp_path):
    cfg = tmp_path / "run.cfg"
    cfg.write_text(
        "# a run\nr-init = 2\nr_target = 6\nmethod = drlora, lora\nno-importance = true\nsteps = 50\n"
    )
    assert _read_config_file(str(cfg))["r_target"] == "6"
    parser, subs = build_parser()
    args = _apply_config_file(
        parser, subs["train"], ["train", "--config", str(cfg), "--steps", "70"]
    )
    assert (args.r_init, args.r_target, args.steps, args.no_importance) == (2, 6, 70, True)
    assert args.method == ["drlora", "lora"]


def test_train_options_beyond_the_paper(capsys):
    from drlora_kernels.cli import _train_spec

    parser, _ = build_parser()
    drl = lambda *a: _train_spec(parser.parse_args(["train", *a])).finetune.drlora  # noqa: E731
    assert drl().grow_until is None and drl().new_slot_lr_scale == 1.0  # the paper by default
    assert drl("--grow-until", "0.25").grow_until == 0.25  # a fraction of the run
    assert drl("--grow-until", "150").grow_until == 150  # a step
    cfg = drl("--new-slot-lr-scale", "2", "--new-slot-lr-steps", "20")
    assert (cfg.new_slot_lr_scale, cfg.new_slot_lr_steps) == (2.0, 20)
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--grow-until", "soon"])
    assert "step (int) or a fraction" in capsys.readouterr().err
    assert main(["train", "--new-slot-lr-scale", "2", "--no-progress"]) == 2  # no steps: refused
    assert "new_slot_lr_steps" in capsys.readouterr().err


def test_train_rejects_bad_config_and_model(tmp_path, capsys):
    cfg = tmp_path / "bad.cfg"
    cfg.write_text("learning_rate_typo = 3\n")
    assert main(["train", "--config", str(cfg)]) == 2
    assert "learning_rate_typo" in capsys.readouterr().err
    assert main(["train", "--model", str(tmp_path / "missing"), "--no-progress"]) == 2
    assert "--model" in capsys.readouterr().err


def _save_tiny_checkpoint_with_tokenizer(path: Path) -> None:
    """A local ``save_pretrained`` directory with a word-level tokenizer (nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from drlora_kernels.train.models import build_model

    words = ["<unk>", "<eos>"] + [f"w{i}" for i in range(60)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    model = build_model("olmoe", "tiny", seed=0)
    assert model.config.vocab_size >= len(words)
    model.save_pretrained(path)
    hf_tok.save_pretrained(path)


def test_train_a_local_checkpoint_with_its_tokenizer(tmp_path, one_thread, capsys):
    ckpt, text, out = tmp_path / "ckpt", tmp_path / "text", tmp_path / "run"
    _save_tiny_checkpoint_with_tokenizer(ckpt)
    text.mkdir()
    gen = torch.Generator().manual_seed(0)
    for d in range(30):
        ids = torch.randint(0, 60, (200,), generator=gen).tolist()
        (text / f"doc{d}.txt").write_text(" ".join(f"w{i}" for i in ids))
    argv = ["train", "--model", str(ckpt), "--data", str(text), "--method", "drlora", "lora"]
    argv += ["--steps", "6", "--batch-size", "2", "--seq-len", "32", "--eval-interval", "3"]
    argv += ["--r-init", "2", "--r-target", "4", "--grow-every", "2", "--warmup-steps", "1"]
    argv += ["--buffer-steps", "1", "--output-dir", str(out), "--no-progress", "--threads", "1"]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["methods"]) == {"drlora", "lora"}
    assert all(math.isfinite(rec["eval_loss"]) for rec in res["methods"].values())
    # the text was read with the checkpoint's tokenizer: 30 docs x (200 words + eos) tokens
    # make at most 6030 // 33 blocks of 32+1 tokens (bytes would make ~4x more)
    m = re.search(r"(\d+) train / (\d+) held-out blocks", capsys.readouterr().out)
    assert m is not None and 150 <= int(m[1]) + int(m[2]) <= 6030 // 33
    # the budget holds at the end: every module's mean rank is r_target
    assert res["methods"]["drlora"]["rank_stats"]["mean"] == pytest.approx(4.0)
