"""Local text corpora, a byte-level tokenizer and deterministic batching.

No downloads: every corpus is a fixed, sorted list of files that exists on a
stock Debian machine with this Python and this virtualenv. Each corpus has an
ordered list of candidate sources; the first one that yields enough text wins,
so a machine without (say) ``/usr/share/common-licenses`` falls back to the
license files shipped inside the virtualenv, deterministically.

Tokens are bytes (ids 0..255) plus three specials. Documents are joined with
``EOS`` into one stream, cut into blocks of ``seq_len + 1`` tokens, and split
train / held-out by block index (every ``eval_every``-th block is held out),
so the split never depends on the machine's file order or on randomness.
"""

from __future__ import annotations

import glob
import gzip
import os
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

BOS_ID, EOS_ID, PAD_ID = 256, 257, 258
VOCAB_SIZE = 259  # 256 bytes + BOS, EOS, PAD


def encode(text: str | bytes) -> list[int]:
    """Byte-level token ids of ``text`` (UTF-8)."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    return list(data)


def decode(ids: list[int] | torch.Tensor) -> str:
    """Text of byte ids; specials are dropped, invalid UTF-8 is replaced."""
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
    return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


# ---------------------------------------------------------------- corpus sources


def _site_packages() -> str:
    return sysconfig.get_paths()["purelib"]


def _stdlib_py() -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    skip = (os.sep + "site-packages" + os.sep, os.sep + "test" + os.sep, os.sep + "tests" + os.sep)
    files = glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
    return [f for f in files if not any(s in f[len(root) :] + os.sep for s in skip)]


def _common_licenses() -> list[str]:
    return glob.glob("/usr/share/common-licenses/*")


def _venv_licenses() -> list[str]:
    sp = _site_packages()
    return glob.glob(os.path.join(sp, "*.dist-info", "LICEN[CS]E*")) + glob.glob(
        os.path.join(sp, "*.dist-info", "licenses", "**", "*"), recursive=True
    )


def _debian_copyright() -> list[str]:
    return glob.glob("/usr/share/doc/*/copyright")


def _venv_metadata() -> list[str]:
    return glob.glob(os.path.join(_site_packages(), "*.dist-info", "METADATA"))


def _torch_headers() -> list[str]:
    return glob.glob(
        os.path.join(_site_packages(), "torch", "include", "**", "*.h"), recursive=True
    )


def _python_headers() -> list[str]:
    return glob.glob(os.path.join(sysconfig.get_paths()["include"], "**", "*.h"), recursive=True)


def _man_pages() -> list[str]:
    return glob.glob("/usr/share/man/man1/*.gz")  # gzipped troff, English section 1


def _perl_modules() -> list[str]:
    return glob.glob("/usr/share/perl/**/*.pm", recursive=True)


def _doc_html() -> list[str]:
    return glob.glob("/usr/share/doc/**/*.html", recursive=True)


def _venv_rst() -> list[str]:
    return glob.glob(os.path.join(_site_packages(), "**", "*.rst"), recursive=True)


def _venv_stubs() -> list[str]:
    return glob.glob(os.path.join(_site_packages(), "**", "*.pyi"), recursive=True)


def _venv_python() -> list[str]:
    # Last-resort source present wherever this package is installed: its own dependencies' code.
    sp = _site_packages()
    return glob.glob(os.path.join(sp, "transformers", "models", "**", "*.py"), recursive=True)


#: corpus name -> (description, candidate sources in order of preference)
CORPORA: dict[str, tuple[str, tuple[tuple[str, Callable[[], list[str]]], ...]]] = {
    "stdlib": (
        "Python standard library sources (code)",
        (("stdlib *.py", _stdlib_py), ("transformers models *.py", _venv_python)),
    ),
    "licenses": (
        "software licenses (English legal prose)",
        (
            ("/usr/share/common-licenses", _common_licenses),
            ("venv dist-info licenses", _venv_licenses),
            ("/usr/share/doc/*/copyright", _debian_copyright),
        ),
    ),
    "copyright": (
        "Debian copyright files (semi-structured prose)",
        (("/usr/share/doc/*/copyright", _debian_copyright), ("venv METADATA", _venv_metadata)),
    ),
    "c-headers": (
        "C/C++ headers (code in another language)",
        (("torch/include *.h", _torch_headers), ("python include *.h", _python_headers)),
    ),
    "metadata": (
        "Python package METADATA (markdown/rst README text)",
        (("venv METADATA", _venv_metadata), ("venv dist-info licenses", _venv_licenses)),
    ),
    "man": (
        "man pages (troff markup)",
        (("/usr/share/man/man1/*.gz", _man_pages), ("venv *.rst", _venv_rst)),
    ),
    "perl": (
        "Perl modules (code with POD documentation)",
        (("/usr/share/perl/**/*.pm", _perl_modules), ("venv *.pyi", _venv_stubs)),
    ),
    "html": (
        "HTML documentation (markup)",
        (("/usr/share/doc/**/*.html", _doc_html), ("venv *.rst", _venv_rst)),
    ),
}

#: mixed-domain corpora: name -> (description, parts); each part gets an equal share of
#: the bytes and the parts' documents are interleaved round-robin, so every stretch of
#: the stream (and of the held-out split) holds several kinds of text.
MIXTURES: dict[str, tuple[str, tuple[str, ...]]] = {
    "mixed": (
        "mixed domains: licenses, copyright files, C/C++ headers, man pages, Perl, HTML, "
        "package READMEs, documents interleaved",
        ("licenses", "copyright", "c-headers", "man", "perl", "html", "metadata"),
    ),
}


def corpus_names() -> list[str]:
    """Every name :func:`load_corpus` accepts."""
    return sorted([*CORPORA, *MIXTURES])


@dataclass(frozen=True)
class Corpus:
    """A loaded corpus: its name, the source that was used and the documents' bytes."""

    name: str
    source: str
    files: tuple[str, ...]
    documents: tuple[bytes, ...]

    @property
    def num_bytes(self) -> int:
        return sum(len(d) for d in self.documents)


def _read_files(
    paths: list[str], max_bytes: int, max_file_bytes: int
) -> tuple[list[str], list[bytes]]:
    # Dedupe by real path (common-licenses has symlinks such as GPL -> GPL-3), sort for determinism.
    seen, files, docs, total = set(), [], [], 0
    for p in sorted(paths):
        real = os.path.realpath(p)
        if real in seen or not os.path.isfile(real):
            continue
        seen.add(real)
        try:
            with (gzip.open if real.endswith(".gz") else open)(real, "rb") as fh:
                data = fh.read(max_file_bytes)
        except (OSError, EOFError):  # gzip.BadGzipFile is an OSError
            continue
        if not data.strip() or b"\x00" in data:
            continue  # empty or binary
        files.append(p)
        docs.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return files, docs


def load_corpus(
    name: str, *, max_bytes: int = 4_000_000, min_bytes: int = 50_000, max_file_bytes: int = 200_000
) -> Corpus:
    """Load corpus ``name`` (a key of :data:`CORPORA`), reading at most ``max_bytes``.

    Files are read in sorted path order; a source with fewer than ``min_bytes``
    bytes is skipped for the next candidate.

    A mixture (:data:`MIXTURES`) loads each part with an equal share of ``max_bytes``
    and interleaves the parts' documents round-robin.

    Raises:
        ValueError: unknown ``name``, or no candidate source has ``min_bytes`` of text.
    """
    if name in MIXTURES:
        return _load_mixture(name, max_bytes, min_bytes, max_file_bytes)
    if name not in CORPORA:
        raise ValueError(f"corpus must be one of {corpus_names()}, got {name!r}")
    tried = []
    for source, finder in CORPORA[name][1]:
        files, docs = _read_files(finder(), max_bytes, max_file_bytes)
        n = sum(len(d) for d in docs)
        if n >= min_bytes:
            return Corpus(name, source, tuple(files), tuple(docs))
        tried.append(f"{source}: {n} bytes")
    raise ValueError(
        f"corpus {name!r}: no source has {min_bytes} bytes of text ({'; '.join(tried)})"
    )


def _load_mixture(name: str, max_bytes: int, min_bytes: int, max_file_bytes: int) -> Corpus:
    parts = MIXTURES[name][1]
    share = max_bytes // len(parts)
    loaded = [
        load_corpus(p, max_bytes=share, min_bytes=min(min_bytes, share), max_file_bytes=share)
        for p in parts
    ]
    files, docs = [], []
    for i in range(max(len(c.documents) for c in loaded)):
        for c in loaded:
            if i < len(c.documents):
                files.append(c.files[i])
                docs.append(c.documents[i])
    source = " + ".join(f"{p}: {c.source}" for p, c in zip(parts, loaded))
    return Corpus(name, source, tuple(files), tuple(docs))


def load_text_files(paths: list[str], *, max_bytes: int = 4_000_000) -> Corpus:
    """A corpus from user-given files or directories (directories are searched recursively)."""
    files = []
    for p in paths:
        if os.path.isdir(p):
            files += [
                f
                for f in glob.glob(os.path.join(p, "**", "*"), recursive=True)
                if os.path.isfile(f)
            ]
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise ValueError(f"data path {p!r} does not exist")
    names, docs = _read_files(files, max_bytes, max_bytes)
    if not docs:
        raise ValueError(f"no readable text in data paths {paths}")
    return Corpus("files", ",".join(paths), tuple(names), tuple(docs))


# ---------------------------------------------------------------- blocks and batches


@dataclass(frozen=True)
class TokenBlocks:
    """A corpus as ``[n, seq_len + 1]`` int64 blocks, split into train and held-out."""

    train: torch.Tensor
    eval: torch.Tensor

    @property
    def seq_len(self) -> int:
        return self.train.shape[1] - 1


def token_stream(corpus: Corpus, tokenizer=None) -> torch.Tensor:
    """All documents as one int64 stream, each followed by ``EOS``.

    ``tokenizer=None``: byte tokens (the models built here). Otherwise a
    ``transformers`` tokenizer (a user checkpoint's), whose ``eos_token_id`` ends documents.
    """
    if tokenizer is None:
        stream = bytearray()
        for doc in corpus.documents:
            stream += doc
            stream.append(0)  # placeholder for EOS, replaced below
        ids = torch.frombuffer(stream, dtype=torch.uint8).to(torch.int64)
        ends = torch.tensor([len(d) for d in corpus.documents]).cumsum(0) + torch.arange(
            len(corpus.documents)
        )
        ids[ends] = EOS_ID
        return ids
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos_token_id to separate documents")
    out: list[int] = []
    for doc in corpus.documents:
        out += tokenizer(doc.decode("utf-8", errors="replace"), add_special_tokens=False)[
            "input_ids"
        ]
        out.append(eos)
    return torch.tensor(out, dtype=torch.int64)


def make_blocks(
    corpus: Corpus, seq_len: int, *, tokenizer=None, eval_every: int = 10, max_eval_blocks: int = 64
) -> TokenBlocks:
    """Tokenize (:func:`token_stream`), cut into ``seq_len + 1`` blocks, hold out every ``eval_every``-th.

    Raises:
        ValueError: the corpus is too small for two blocks of ``seq_len + 1`` tokens.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if eval_every < 2:
        raise ValueError(f"eval_every must be >= 2, got {eval_every}")
    ids = token_stream(corpus, tokenizer)
    n = ids.numel() // (seq_len + 1)
    if n < 2:
        raise ValueError(
            f"corpus {corpus.name!r} ({ids.numel()} tokens) is too small for seq_len={seq_len}"
        )
    blocks = ids[: n * (seq_len + 1)].view(n, seq_len + 1)
    is_eval = torch.arange(n) % eval_every == eval_every - 1
    held_out = blocks[is_eval][:max_eval_blocks]
    return TokenBlocks(train=blocks[~is_eval].contiguous(), eval=held_out.contiguous())


def train_batches(
    blocks: torch.Tensor, batch_size: int, steps: int, seed: int
) -> Iterator[torch.Tensor]:
    """``steps`` batches of ``[batch_size, seq_len + 1]``: epochs of a seeded permutation.

    Deterministic given ``seed``; independent of torch's global RNG.
    """
    if batch_size <= 0 or steps < 0:
        raise ValueError(f"batch_size must be positive and steps >= 0, got {batch_size}, {steps}")
    gen = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.int64)
    for _ in range(steps):
        while order.numel() < batch_size:
            order = torch.cat([order, torch.randperm(blocks.shape[0], generator=gen)])
        idx, order = order[:batch_size], order[batch_size:]
        yield blocks[idx]
