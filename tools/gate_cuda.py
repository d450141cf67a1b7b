"""Ahead-of-time compile gate of the CUDA kernels (csrc/cuda) for sm_80 (A100) and sm_90 (H100).

Compiles every ``csrc/cuda/*.cu`` once with ``nvcc -Xptxas -v`` for both targets (the CUTLASS
headers of the ``nvidia-cutlass`` wheel, the flags of the CMake build), parses ptxas's report
(registers, spill stores/loads, stack frame, static shared memory per kernel and target) and adds
each CUTLASS kernel's dynamic shared memory (``sizeof(Kernel::SharedStorage)``, read by a small
host-only probe compiled against the same headers). No GPU is needed.

Fails (exit 1) on: a compile error; any kernel that spills (spill stores or loads > 0); any
kernel whose shared memory exceeds what one block may use on the target (sm_80: 163 KiB,
sm_90: 227 KiB); a CUTLASS kernel missing from the report (a parse that found nothing must not
pass).

    python tools/gate_cuda.py               # compile, print the table, exit 0/1
    python tools/gate_cuda.py --markdown    # the table as Markdown (the README's)
    python tools/gate_cuda.py --jobs 2      # parallel nvcc processes (default: 2)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CUDA_DIR = ROOT / "csrc" / "cuda"
#: target -> largest shared memory one block may use (opt-in dynamic + static), bytes
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
TARGETS = tuple(SMEM_LIMIT)
#: flags of the CMake build's CUDA compile (CMakeLists.txt), minus the include paths
NVCC_FLAGS = ("-std=c++17", "-O3", "--expt-relaxed-constexpr", "-lineinfo")
#: the CUTLASS kernels (GemmKind x dtype), as the probe names them and as each source holds them
GEMM_SOURCES = {
    "kShrink": "gemm_shrink.cu",
    "kRowRow": "gemm_row_row.cu",
    "kRowCol": "gemm_row_col.cu",
    "kColRow": "gemm_col_row.cu",
}
DTYPES = {"kBFloat16": "bf16", "kFloat16": "fp16"}

_ENTRY = re.compile(r"Compiling entry function '(?P<name>[^']+)' for 'sm_(?P<cc>\d+)'")
_PROPS = re.compile(r"Function properties for (?P<name>\S+)")
_SPILLS = re.compile(
    r"(?P<stack>\d+) bytes stack frame, (?P<st>\d+) bytes spill stores, (?P<ld>\d+) bytes spill loads"
)
_USED = re.compile(r"Used (?P<regs>\d+) registers")
_SMEM = re.compile(r"(?P<smem>\d+) bytes smem")


@dataclass
class Row:
    """One kernel compiled for one target."""

    source: str
    kernel: str
    cc: int
    registers: int = -1
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    static_smem: int = 0
    dynamic_smem: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def smem(self) -> int:
        return self.static_smem + self.dynamic_smem


def find_nvcc() -> str | None:
    """nvcc from CUDACXX, PATH or /usr/local/cuda/bin (as setup.py finds it)."""
    for cand in (os.environ.get("CUDACXX"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and Path(cand).is_file():
            return cand
    return None


def find_cutlass() -> str | None:
    """The CUTLASS include dir: DRLORA_CUTLASS_INCLUDE_DIR or the nvidia-cutlass wheel's."""
    explicit = os.environ.get("DRLORA_CUTLASS_INCLUDE_DIR")
    if explicit:
        return explicit
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        return None
    include = Path(list(spec.submodule_search_locations)[0]) / "source" / "include"
    return str(include) if (include / "cutlass" / "cutlass.h").is_file() else None


def _gencode(targets) -> list[str]:
    return [f"-gencode=arch=compute_{cc},code=sm_{cc}" for cc in targets]


def _compile(nvcc: str, cutlass: str, source: Path, out_dir: Path, targets) -> tuple[int, str]:
    """nvcc -Xptxas -v on one source for all targets; returns (exit code, combined output)."""
    cmd = [
        nvcc,
        *NVCC_FLAGS,
        *_gencode(targets),
        "-Xptxas",
        "-v",
        f"-I{CUDA_DIR}",
        "-isystem",
        cutlass,
        "-c",
        str(source),
        "-o",
        str(out_dir / (source.stem + ".o")),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr


def demangle(names: list[str]) -> dict[str, str]:
    """Mangled -> demangled with a c++filt (identity where none exists or it gives up)."""
    tool = next((t for t in ("llvm-cxxfilt", "cu++filt", "c++filt") if shutil.which(t)), None)
    if tool is None or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names) + "\n", capture_output=True, text=True)
    lines = out.stdout.splitlines()
    return dict(zip(names, lines)) if len(lines) == len(names) else {n: n for n in names}


def short_name(source: str, name: str) -> str:
    """A readable label: GemmKind<dtype> for a CUTLASS kernel (read from the source file and the
    mangled or demangled name), else the demangled function without its namespace."""
    if "cutlass6Kernel" in name or name.startswith("void cutlass::Kernel<"):
        kind = {
            "gemm_shrink": "kShrink",
            "gemm_row_row": "kRowRow",
            "gemm_row_col": "kRowCol",
            "gemm_col_row": "kColRow",
        }.get(source, source)
        dtype = "bf16" if "bfloat16_t" in name else "fp16" if "half_t" in name else "?"
        return f"{kind}<{dtype}>"
    head = name.replace("(anonymous namespace)::", "").split("(", 1)[0].removeprefix("void ")
    head = head.removeprefix("drlora::cuda::kernels::detail::")
    return head.replace("__nv_bfloat16", "bf16").replace("__half", "fp16")


def parse_ptxas(source: str, text: str) -> list[Row]:
    """Rows of one source's ptxas -v report (entry functions only)."""
    rows: list[Row] = []
    current: Row | None = None
    props_for: str | None = None
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            current = Row(source=source, kernel=m["name"], cc=int(m["cc"]))
            rows.append(current)
            props_for = None
        elif m := _PROPS.search(line):
            props_for = m["name"]
        elif (m := _SPILLS.search(line)) and current and props_for == current.kernel:
            current.stack = int(m["stack"])
            current.spill_stores = int(m["st"])
            current.spill_loads = int(m["ld"])
        elif (m := _USED.search(line)) and current:
            current.registers = int(m["regs"])
            if s := _SMEM.search(line):
                current.static_smem = int(s["smem"])
    return rows


_PROBE = """
#include <cstdio>
#include "cutlass_grouped.cuh"
using namespace drlora::cuda::kernels;
using namespace drlora::cuda::kernels::detail;
#define SMEM(K, D) std::printf("%s %s %d\\n", #K, #D, shared_memory_bytes<GemmKind::K, Dtype::D>())
int main() {
  SMEM(kShrink, kBFloat16); SMEM(kShrink, kFloat16);
  SMEM(kRowRow, kBFloat16); SMEM(kRowRow, kFloat16);
  SMEM(kRowCol, kBFloat16); SMEM(kRowCol, kFloat16);
  SMEM(kColRow, kBFloat16); SMEM(kColRow, kFloat16);
  return 0;
}
"""


def probe_dynamic_smem(nvcc: str, cutlass: str, work: Path) -> tuple[dict[str, int], str]:
    """{'kRowCol<bf16>': bytes, ...}: sizeof(SharedStorage) of each CUTLASS kernel (host probe)."""
    src = work / "smem_probe.cu"
    exe = work / "smem_probe"
    src.write_text(_PROBE)
    cmd = [nvcc, *NVCC_FLAGS, *_gencode(TARGETS[:1]), f"-I{CUDA_DIR}", "-isystem", cutlass]
    proc = subprocess.run([*cmd, str(src), "-o", str(exe)], capture_output=True, text=True)
    if proc.returncode != 0:
        return {}, proc.stdout + proc.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    if run.returncode != 0:
        return {}, run.stdout + run.stderr
    sizes = {}
    for line in run.stdout.splitlines():
        kind, dtype, size = line.split()
        sizes[f"{kind}<{DTYPES[dtype]}>"] = int(size)
    return sizes, ""


def judge(row: Row) -> None:
    """Fill row.problems: spills, shared memory over the target's limit."""
    if row.spill_stores or row.spill_loads:
        row.problems.append(f"spills {row.spill_stores} B stores / {row.spill_loads} B loads")
    limit = SMEM_LIMIT.get(row.cc)
    if limit is not None and row.smem > limit:
        row.problems.append(f"shared memory {row.smem} B > {limit} B (sm_{row.cc})")
    if row.registers < 0:
        row.problems.append("no register count in the ptxas report")


def collect(targets=TARGETS, jobs: int = 2, log=print) -> tuple[list[Row], list[str]]:
    """Compile every csrc/cuda/*.cu; returns (rows, errors)."""
    nvcc, cutlass = find_nvcc(), find_cutlass()
    if nvcc is None:
        return [], ["nvcc not found (CUDACXX, PATH, /usr/local/cuda/bin)"]
    if cutlass is None:
        return [], ["CUTLASS headers not found: pip install nvidia-cutlass==4.2.0.0"]
    sources = sorted(CUDA_DIR.glob("*.cu"))
    errors: list[str] = []
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="drlora-gate-cuda-") as tmp:
        work = Path(tmp)
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            probe = pool.submit(probe_dynamic_smem, nvcc, cutlass, work)
            futures = {
                pool.submit(_compile, nvcc, cutlass, src, work, targets): src for src in sources
            }
            for fut in concurrent.futures.as_completed(futures):
                src = futures[fut]
                code, text = fut.result()
                if code != 0:
                    errors.append(f"{src.name}: nvcc failed ({code}):\n{text[-4000:]}")
                    continue
                found = parse_ptxas(src.stem, text)
                log(f"  compiled {src.name}: {len(found)} kernel(s)")
                rows.extend(found)
            sizes, probe_error = probe.result()
    if probe_error:
        errors.append(f"shared-memory probe failed:\n{probe_error[-4000:]}")
    names = demangle(sorted({r.kernel for r in rows}))
    for row in rows:
        row.kernel = short_name(row.source, names.get(row.kernel, row.kernel))
        if row.kernel in sizes:
            row.dynamic_smem = sizes[row.kernel]
        judge(row)
    for kind, source in GEMM_SOURCES.items():
        for dtype in DTYPES.values():
            for cc in targets:
                label = f"{kind}<{dtype}>"
                if not any(r.kernel == label and r.cc == cc for r in rows):
                    errors.append(f"{label} for sm_{cc} missing from the ptxas report of {source}")
                elif label not in sizes and not probe_error:
                    errors.append(f"{label}: no shared-memory size from the probe")
    rows.sort(key=lambda r: (r.source, r.kernel, r.cc))
    return rows, errors


def table(rows: list[Row], markdown: bool = False) -> str:
    head = ["kernel", "source", "arch", "registers", "spills (st/ld B)", "stack B", "smem B", "ok"]
    body = [
        [
            r.kernel,
            f"{r.source}.cu",
            f"sm_{r.cc}",
            str(r.registers),
            f"{r.spill_stores}/{r.spill_loads}",
            str(r.stack),
            f"{r.smem}" + (" (dynamic)" if r.dynamic_smem else ""),
            "yes" if not r.problems else "NO: " + "; ".join(r.problems),
        ]
        for r in rows
    ]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += [
            "| " + " | ".join(f"`{c}`" if i == 0 else c for i, c in enumerate(b)) + " |"
            for b in body
        ]
        return "\n".join(lines)
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), *(fmt.format(*b) for b in body)])


def main(argv: list[str] | None = None) -> int:
    """Compile, print the resource table, return 0 (pass) or 1 (fail)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", default=",".join(map(str, TARGETS)), help="comma list of 80, 90")
    p.add_argument("--jobs", type=int, default=int(os.environ.get("MAX_JOBS", "2")))
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = p.parse_args(argv)
    targets = tuple(int(t) for t in args.targets.split(","))
    unknown = [t for t in targets if t not in SMEM_LIMIT]
    if unknown:
        p.error(f"unknown target(s) {unknown}; known: {sorted(SMEM_LIMIT)}")
    start = time.perf_counter()
    rows, errors = collect(targets, args.jobs, log=lambda s: print(s, file=sys.stderr))
    print(table(rows, markdown=args.markdown))
    failed = [r for r in rows if r.problems]
    for msg in errors:
        print(f"ERROR: {msg}", file=sys.stderr)
    for r in failed:
        print(f"FAIL: {r.kernel} sm_{r.cc}: {'; '.join(r.problems)}", file=sys.stderr)
    verdict = "FAIL" if errors or failed else "PASS"
    print(
        f"gate_cuda: {verdict}: {len(rows)} kernel compiles, {len(failed)} over limits, "
        f"{len(errors)} error(s), {time.perf_counter() - start:.0f} s",
        file=sys.stderr,
    )
    return 1 if errors or failed else 0


if __name__ == "__main__":
    sys.exit(main())
