"""List the functions of Paddle's CPU libraries that hold AVX-512 instructions.

Paddle's CPU wheel is built for AVX2; a few kernels are compiled with AVX-512 and some of them
run it without checking the CPU (``phi::fusion::RmsNormAvxKernel`` behind ``fused_rms_norm``),
which kills the process with SIGILL on CPUs without AVX-512. This disassembles the libraries
(``objdump -d``, from binutils) and prints each function that uses an AVX-512-only register
(zmm, xmm/ymm 16-31, opmask k1-k7) or mnemonic, demangled. MKL and oneDNN are not listed: they
pick their code path from the CPU at run time. The libraries are stripped of local symbols, so
code of an unnamed function (an OpenMP-outlined loop of a fused kernel) is listed under the
exported symbol before it: on Paddle 3.3.1 that is how ``common::DDim::operator[]``,
``std::sqrt(float)`` and a hash-table ``rehash`` appear (their own code is plain; checked with
``objdump --start-address``). The result backs the table in
``paddlemix/models/internlm_xcomposer2/kernels.py``::

    python scripts/avx512_audit.py [--out audit.txt]
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import re
import subprocess
from pathlib import Path
from typing import Iterator, List

LIBRARIES = ("libs/libphi_core.so", "base/libpaddle.so")
FUNCTION = re.compile(r"^[0-9a-f]+ <(.*)>:$")
AVX512 = re.compile(r"%zmm|%[xy]mm(1[6-9]|2\d|3[01])\b|%k[1-7]\b|\bv(pternlog|movdq[au](32|64)|permt2|permi2|"
                    r"extract[if](32|64)x|insert[if](32|64)x|pcompress|pexpand|scalef|rndscale|rcp14|rsqrt14|getexp|"
                    r"fixupimm|pro[lr]v?[dq]|pconflict|plzcnt|pmov\w+2m|broadcast[if](32|64)x)")


def avx512_functions(library: Path) -> Iterator[str]:
    dump = subprocess.Popen(["objdump", "-d", "--no-show-raw-insn", "-C", str(library)], stdout=subprocess.PIPE,
                            text=True, errors="replace")
    current, hit = None, False
    for line in dump.stdout:
        match = FUNCTION.match(line)
        if match:
            if hit:
                yield current
            current, hit = match.group(1), False
        elif not hit and AVX512.search(line):
            hit = True
    if hit:
        yield current
    if dump.wait() != 0:
        raise RuntimeError(f"objdump failed on {library} (exit {dump.returncode})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="also write the list here")
    args = parser.parse_args()
    root = Path(importlib.util.find_spec("paddle").origin).parent  # without importing Paddle
    lines: List[str] = [f"# Paddle {importlib.metadata.version('paddlepaddle')}: functions with AVX-512 instructions"]
    for name in LIBRARIES:
        found = sorted(set(avx512_functions(root / name)))
        lines += [f"## {name}: {len(found)}", *found]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
