"""The ``drlora`` command line (also ``python -m drlora_kernels``). Argument parsing only.

Subcommands:

* ``demo``    - the main job with embedded defaults (``make demo``): pre-train a tiny
  OLMoE-style MoE on the Python standard library, fine-tune it on the machine's
  software licenses with LoRA, DR-LoRA and masked DR-LoRA at the same rank budget,
  print a table and write ``results.json`` and two PNGs to ``runs/demo``;
* ``train``   - the same pipeline with your model, data and hyperparameters (flags, or
  a ``key = value`` config file whose keys are the flag names);
* ``quality`` - the longer quality study (architectures x corpora x seeds, ablations);
* ``bench``   - forwards its arguments to ``python -m bench`` (repository checkout only).

A real MoE checkpoint (a local ``save_pretrained`` directory with its tokenizer; nothing is
downloaded) is fine-tuned the same way, e.g. on a GPU with the Triton kernels::

    drlora train --model /models/OLMoE-1B-7B-0125 --device cuda --dtype bf16 --backend triton \
        --data my_corpus/ --method drlora lora --r-init 32 --r-target 64 --p-grow 0.1 \
        --steps 3000 --grow-every 200 --buffer-steps 200 --batch-size 8 --seq-len 1024 --lr 1e-4

(the paper's OLMoE settings; ``--method drlora lora`` runs both at the same budget).
Without a tokenizer in the directory the text is read as bytes, which only suits models
pre-trained here. Peak memory on CUDA is ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_DEMO_DIR = os.path.join("runs", "demo")
DEFAULT_TRAIN_DIR = os.path.join("runs", "train")


# ---------------------------------------------------------------- demo


def _demo(args: argparse.Namespace) -> int:
    from .train.pipeline import demo_spec

    _set_threads(args.threads)
    spec = demo_spec(tiny=args.tiny, seed=args.seed)
    print(
        "DR-LoRA demo: pre-train a tiny MoE on local Python sources, then fine-tune it on local "
        f"license texts with {', '.join(spec.methods)} at the same rank budget "
        f"(r_init={spec.finetune.drlora.r_init} -> r_target={spec.finetune.drlora.r_target}, "
        f"r_max={spec.finetune.drlora.r_max})"
    )
    run_dir = args.run_dir or (DEFAULT_DEMO_DIR + ("-tiny" if args.tiny else ""))
    return _run_and_print(spec, run_dir, progress=not args.no_progress)


def _run_and_print(
    spec, run_dir: str, *, progress: bool, resume_run: bool = False, parallel=None
) -> int:
    from .train.pipeline import run_comparison

    main = parallel is None or parallel.is_main
    t0 = time.perf_counter()
    log = print if main else _silent
    payload = run_comparison(
        spec, run_dir, progress=progress, log=log, resume_run=resume_run, parallel=parallel
    )
    if not main:
        return 0
    print()
    print((Path(run_dir) / "summary.txt").read_text().rstrip())
    print(f"\nwall time {time.perf_counter() - t0:.0f} s; outputs in {run_dir}/:")
    for name in ("results.json", "summary.txt", "loss_curves.png", "ranks_heatmap.png", "adapters"):
        if (Path(run_dir) / name).exists():
            print(f"  {Path(run_dir) / name}")
    checks = payload.get("checks", {})
    if checks.get("masked_same_final_ranks") is False:
        print(
            "note: masked and variable-rank DR-LoRA ended with different ranks (float ties in the saliency)"
        )
    return 0


def _silent(*args, **kwargs) -> None:
    """The log of the processes other than global rank 0 under torchrun."""


# ---------------------------------------------------------------- train


def _read_config_file(path: str) -> dict[str, str]:
    """``key = value`` lines (``#`` comments, blank lines ignored); keys are flag names."""
    out = {}
    with open(path) as fh:
        for n, raw in enumerate(fh, 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            if "=" not in line:
                raise ValueError(f"{path}:{n}: expected 'key = value', got {raw.strip()!r}")
            key, value = (s.strip() for s in line.split("=", 1))
            out[key.lstrip("-").replace("-", "_")] = value
    return out


def _apply_config_file(
    parser: argparse.ArgumentParser, sub: argparse.ArgumentParser, argv: list[str]
):
    """Parse ``argv`` with ``--config`` values as defaults, so explicit flags win."""
    args = parser.parse_args(argv)
    if getattr(args, "config", None) is None:
        return args
    values = _read_config_file(args.config)
    actions = {a.dest: a for a in sub._actions}
    defaults = {}
    for key, raw in values.items():
        if key not in actions or key in ("help", "config"):
            raise ValueError(
                f"{args.config}: unknown key {key!r} (use the flag names of 'drlora train')"
            )
        action = actions[key]
        if isinstance(action, argparse._StoreTrueAction):
            defaults[key] = raw.lower() in ("1", "true", "yes", "on")
        elif action.nargs in ("+", "*"):
            defaults[key] = [
                action.type(v) if action.type else v for v in raw.replace(",", " ").split()
            ]
        else:
            defaults[key] = action.type(raw) if action.type else raw
    sub.set_defaults(**defaults)
    return parser.parse_args(argv)


def check_device(device: str) -> None:
    """Raise ``ValueError`` (one line) unless ``device`` names a device this torch can use."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"--device {device!r} is not a device name ({exc})") from None
    if dev.type == "cpu":
        return
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = (
                "this torch was built without CUDA"
                if torch.version.cuda is None
                else "no CUDA device is visible"
            )
            raise ValueError(
                f"--device {device}: CUDA is not available ({why}; torch {torch.__version__})"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {device}: there are {torch.cuda.device_count()} CUDA devices"
            )
        return
    backend = getattr(torch.backends, dev.type, None) or getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise ValueError(f"--device {device}: {dev.type} is not available on this machine")


# flags that may accompany --resume (everything else comes from the run directory)
_RESUME_FLAGS = {"resume", "threads", "no_progress", "config", "func", "command"}


def _resume_spec(args: argparse.Namespace, train_parser: argparse.ArgumentParser):
    from .train.resume import load_spec

    changed = sorted(
        "--" + dest.replace("_", "-")
        for dest, value in vars(args).items()
        if dest not in _RESUME_FLAGS and value != train_parser.get_default(dest)
    )
    if changed:
        raise ValueError(
            f"--resume takes the run's settings from {args.resume}/run_spec.json; drop {', '.join(changed)}"
        )
    spec = load_spec(args.resume)
    check_device(spec.device)
    return spec


def parse_grow_until(text: str) -> int | float:
    """``--grow-until``: a step (``150``) or a fraction of the run (``0.25``)."""
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a step (int) or a fraction of the run (float), got {text!r}"
        ) from None


def add_option_flags(g, *, grow_until_default=None) -> None:
    """The options beyond the paper (DRLoRAConfig), shared by ``drlora train`` and ``quality``."""
    g.add_argument(
        "--grow-until", type=parse_grow_until, default=grow_until_default,
        help="beyond the paper: allocate the whole budget by this step (int) or fraction of "
        "the run (float); events spaced evenly from the warmup (default: the paper's schedule)",
    )  # fmt: skip
    g.add_argument(
        "--new-slot-lr-scale", type=float, default=1.0,
        help="beyond the paper: learning-rate multiplier of newly grown slots (RankAwareAdamW)",
    )  # fmt: skip
    g.add_argument(
        "--new-slot-lr-steps", type=int, default=0,
        help="how many updates of a newly grown slot get --new-slot-lr-scale",
    )  # fmt: skip


def _optimizer(args: argparse.Namespace) -> str:
    """``--optimizer``, defaulting to ``adamw`` under ZeRO (its partitions) and to
    ``rank_aware_adamw`` elsewhere."""
    if args.optimizer is not None:
        return args.optimizer
    return "adamw" if (args.parallel or "").startswith("zero") else "rank_aware_adamw"


def _train_spec(args: argparse.Namespace):
    from .config import DRLoRAConfig
    from .train import loop
    from .train.distributed import check_optimizer
    from .train.models import ARCHITECTURES
    from .train.pipeline import RunSpec

    check_optimizer(args.parallel, _optimizer(args))
    is_arch = args.model in ARCHITECTURES
    if not is_arch and not os.path.isdir(args.model):
        raise ValueError(
            f"--model must be one of {ARCHITECTURES} or a local model directory, got {args.model!r}"
        )
    check_device(args.device)
    methods = tuple(m for item in args.method for m in item.split(",") if m)
    drl = DRLoRAConfig(
        r_init=args.r_init,
        r_target=args.r_target,
        r_max=args.r_max,
        grow_every=args.grow_every,
        warmup_steps=args.warmup_steps,
        buffer_steps=args.buffer_steps,
        p_grow=args.p_grow,
        grow_until=args.grow_until,
        new_slot_lr_scale=args.new_slot_lr_scale,
        new_slot_lr_steps=args.new_slot_lr_steps,
        beta=args.beta,
        gamma=args.gamma,
        allocation=args.allocation,
        use_frequency=not args.no_frequency,
        use_importance=not args.no_importance,
        seed=args.seed,
        backend=args.backend,
    )
    ft = loop.FinetuneConfig(
        steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
        eval_interval=args.eval_interval, seed=args.seed, drlora=drl, optimizer=_optimizer(args),
    )  # fmt: skip
    pre = loop.PretrainConfig(
        steps=args.pretrain_steps,
        batch_size=args.batch_size * 2,
        seq_len=args.seq_len,
        seed=args.seed,
    )
    return RunSpec(
        arch=args.model if is_arch else "local",
        size=args.size,
        model_path=None if is_arch else args.model,
        pretrain_corpus=args.pretrain_corpus,
        target_corpus=args.corpus,
        target_paths=tuple(args.data or ()),
        methods=methods,
        pretrain=pre,
        finetune=ft,
        device=args.device,
        dtype=args.dtype,
        speed_rounds=args.speed_rounds,
        checkpoint_every=args.eval_interval
        if args.checkpoint_every is None
        else args.checkpoint_every,
    )


def _train(args: argparse.Namespace) -> int:
    import dataclasses

    from .train.distributed import init_from_env, shutdown

    _set_threads(args.threads)
    try:
        if args.resume is not None:
            spec, run_dir = _resume_spec(args, build_parser()[1]["train"]), args.resume
        else:
            spec, run_dir = _train_spec(args), args.output_dir
        parallel = init_from_env(args.parallel, args.device)  # under torchrun: join the job
    except ValueError as exc:  # bad flag values: say which, without a traceback
        print(f"drlora train: error: {exc}", file=sys.stderr)
        return 2
    if parallel is None and args.parallel is not None:
        print(f"note: --parallel {args.parallel} ignored: one process (launch with torchrun)")
    if parallel is not None and (args.resume is not None or args.checkpoint_every):
        print(
            "drlora train: error: --resume / --checkpoint-every are single-process only; for "
            "resumable multi-process runs use transformers.Trainer + DRLoRACallback (README, Multi-GPU)",
            file=sys.stderr,
        )
        shutdown(parallel)
        return 2
    if parallel is not None and spec.finetune.batch_size % parallel.world:
        print(
            f"drlora train: error: --batch-size {spec.finetune.batch_size} (the global batch) does "
            f"not split over {parallel.world} processes",
            file=sys.stderr,
        )
        shutdown(parallel)
        return 2
    try:
        main = parallel is None or parallel.is_main
        if parallel is not None:
            # resume checkpoints (on by default) are single-process: say so, then run without
            spec = dataclasses.replace(spec, device=parallel.device, checkpoint_every=0)
            if main:
                print(
                    "note: no resume checkpoints under torchrun (--resume is single-process only)"
                )
                print(
                    f"{parallel.world} processes ({parallel.parallel}), global batch "
                    f"{spec.finetune.batch_size} = {parallel.world} x "
                    f"{spec.finetune.batch_size // parallel.world} rows"
                )
        if main and spec.model_path is None and spec.pretrain.steps == 0:
            print("note: --pretrain-steps 0: fine-tuning a randomly initialised model")
        return _run_and_print(
            spec, run_dir, progress=not args.no_progress, resume_run=args.resume is not None,
            parallel=parallel,
        )  # fmt: skip
    finally:
        shutdown(parallel)


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from .train.data import corpus_names
    from .train.models import SIZES

    g = p.add_argument_group("model and data")
    g.add_argument("--config", help="a 'key = value' file of these flags (explicit flags win)")
    g.add_argument(
        "--model",
        default="olmoe",
        help="olmoe | qwen2_moe | mixtral (built here) or a local checkpoint directory",
    )
    g.add_argument(
        "--size", default="small", choices=sorted(SIZES), help="size preset of a model built here"
    )
    g.add_argument(
        "--pretrain-steps",
        type=int,
        default=300,
        help="pre-training steps of a model built here (cached)",
    )
    g.add_argument("--pretrain-corpus", default="stdlib", choices=corpus_names())
    g.add_argument(
        "--corpus",
        default="licenses",
        choices=corpus_names(),
        help="fine-tuning corpus (if no --data)",
    )
    g.add_argument(
        "--data", nargs="+", help="fine-tuning text files or directories (instead of --corpus)"
    )
    g = p.add_argument_group("method")
    g.add_argument(
        "--method",
        nargs="+",
        default=["drlora"],
        help="drlora, lora and/or masked (space or comma separated)",
    )
    g.add_argument("--r-init", type=int, default=4)
    g.add_argument("--r-target", type=int, default=8)
    g.add_argument("--r-max", type=int, default=None, help="default 2 * r_target")
    g.add_argument("--grow-every", type=int, default=20)
    g.add_argument("--warmup-steps", type=int, default=None, help="default 3%% of --steps")
    g.add_argument("--buffer-steps", type=int, default=20)
    g.add_argument("--p-grow", type=float, default=0.25)
    add_option_flags(g)
    g.add_argument("--beta", type=float, default=0.9)
    g.add_argument("--gamma", type=float, default=1.2)
    g.add_argument("--allocation", default="per_layer", choices=["per_layer", "global"])
    g.add_argument(
        "--no-frequency", action="store_true", help="ablation: saliency without routing frequency"
    )
    g.add_argument(
        "--no-importance", action="store_true", help="ablation: saliency without rank importance"
    )
    g = p.add_argument_group("optimisation and run")
    g.add_argument("--steps", type=int, default=200)
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--seq-len", type=int, default=128)
    g.add_argument("--lr", type=float, default=2e-3)
    g.add_argument("--eval-interval", type=int, default=20)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    g.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    g.add_argument(
        "--speed-rounds", type=int, default=8,
        help="after training, time this many steps of every method interleaved for the "
        "tokens/s column; holds one model copy per method in memory at once (0: use the "
        "step times of the training runs instead)",
    )  # fmt: skip
    g.add_argument("--backend", default=None, choices=["auto", "reference", "triton", "native"])
    g.add_argument(
        "--optimizer", default=None, choices=["rank_aware_adamw", "adamw"],
        help="RankAwareAdamW (per-slot step counts; the default) or torch.optim.AdamW (the "
        "default, and the only choice, under --parallel zero1/zero2)",
    )  # fmt: skip
    g.add_argument(
        "--parallel", default=None, choices=["ddp", "fsdp2", "zero1", "zero2"],
        help="under torchrun: DistributedDataParallel (default), FSDP2 fully_shard, or "
        "DeepSpeed ZeRO-1/2 (needs deepspeed); the global --batch-size is split over the "
        "processes",
    )  # fmt: skip
    g.add_argument("--output-dir", default=DEFAULT_TRAIN_DIR)
    g.add_argument(
        "--checkpoint-every", type=int, default=None,
        help="save the fine-tuning state every N steps for --resume (default: --eval-interval; 0: never)",
    )  # fmt: skip
    g.add_argument(
        "--resume", metavar="RUN_DIR", default=None,
        help="continue an interrupted run in RUN_DIR (its output dir) where it stopped, with its own settings",
    )  # fmt: skip
    g.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    g.add_argument("--no-progress", action="store_true")


# ---------------------------------------------------------------- quality, bench


def _quality(args: argparse.Namespace) -> int:
    from . import quality

    _set_threads(args.threads)
    return quality.run(args)


def _repo_root() -> Path | None:
    root = Path(__file__).resolve().parent.parent
    return root if (root / "bench" / "__init__.py").is_file() else None


def _bench(args: argparse.Namespace) -> int:
    root = _repo_root()
    if root is None:
        print(
            "drlora bench: the bench package ships with the repository checkout, not the installed wheel",
            file=sys.stderr,
        )
        return 2
    return subprocess.call([sys.executable, "-m", "bench", *args.bench_args], cwd=root)


def _set_threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


# ---------------------------------------------------------------- main


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(
        prog="drlora",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the main job end to end with embedded defaults (make demo)")
    demo.add_argument(
        "--seed", type=int, default=0, help="seeds models, data order and growth draws"
    )
    demo.add_argument(
        "--run-dir",
        default=None,
        help=f"default {DEFAULT_DEMO_DIR} ({DEFAULT_DEMO_DIR}-tiny with --tiny)",
    )
    demo.add_argument(
        "--tiny",
        action="store_true",
        help="a seconds-long version (tiny model, few steps) for tests",
    )
    demo.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(func=_demo)

    train = sub.add_parser("train", help="fine-tune with DR-LoRA / LoRA / masked DR-LoRA")
    _add_train_args(train)
    train.set_defaults(func=_train)

    quality = sub.add_parser(
        "quality", help="quality study: DR-LoRA vs LoRA over architectures, corpora, seeds"
    )
    from .quality import add_arguments

    add_arguments(quality)
    quality.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    quality.set_defaults(func=_quality)

    bench = sub.add_parser(
        "bench", help="run the throughput harness (python -m bench ...)", add_help=False
    )
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(func=_bench)
    return parser, {"demo": demo, "train": train, "quality": quality, "bench": bench}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, subs = build_parser()
    if argv and argv[0] == "bench":  # forward everything, including -h, to the harness
        return _bench(argparse.Namespace(bench_args=argv[1:]))
    if argv[:1] == ["train"]:
        try:
            args = _apply_config_file(parser, subs["train"], argv)
        except (OSError, ValueError) as exc:
            print(f"drlora train: error in --config: {exc}", file=sys.stderr)
            return 2
    else:
        args = parser.parse_args(argv)
    return args.func(args)


__all__ = ["build_parser", "main"]
