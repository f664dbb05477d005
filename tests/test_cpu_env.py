"""CPU-vendor settings applied by the entry points before Paddle loads (``paddlemix/cpu_env.py``)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from paddlemix import cpu_env

AVX2 = frozenset({"sse4_2", "avx", "avx2", "fma"})
AVX512 = AVX2 | {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}


@pytest.mark.parametrize("vendor, flags, expected", [
    ("AuthenticAMD", AVX512, cpu_env.MKL_AVX2),  # Zen 4: MKL's AVX2 path (its "6" crashes a Zen 4)
    ("AuthenticAMD", AVX2, cpu_env.MKL_AVX2),  # Zen 3
    ("HygonGenuine", AVX2, cpu_env.MKL_AVX2),
    ("AuthenticAMD", frozenset({"sse4_2", "avx"}), None),  # no AVX2: leave MKL alone
    ("GenuineIntel", AVX512, None),  # MKL already takes Intel's best path
    ("", AVX512, None),
])
def test_the_mkl_path_follows_the_cpus_own_flags(vendor, flags, expected):
    assert cpu_env.mkl_cpu_type(vendor, flags) == expected


def test_the_users_environment_wins():
    amd = {"vendor": "AuthenticAMD", "model": "AMD EPYC", "flags": AVX2}
    tuned = {"MKL_DEBUG_CPU_TYPE": "5", "KMP_BLOCKTIME": "0"}
    env = {}
    assert cpu_env.configure_cpu_environment(env, amd) == tuned and env == tuned
    env = {"MKL_DEBUG_CPU_TYPE": "4"}
    assert cpu_env.configure_cpu_environment(env, amd) == {"KMP_BLOCKTIME": "0"}
    assert env == {"MKL_DEBUG_CPU_TYPE": "4", "KMP_BLOCKTIME": "0"}
    env = {"MKL_DEBUG_CPU_TYPE": "4", "KMP_BLOCKTIME": "200"}
    assert cpu_env.configure_cpu_environment(env, amd) == {} and env == {"MKL_DEBUG_CPU_TYPE": "4", "KMP_BLOCKTIME": "200"}
    env = {"IXC2_CPU_TUNING": "0"}
    assert cpu_env.configure_cpu_environment(env, amd) == {} and env == {"IXC2_CPU_TUNING": "0"}
    assert cpu_env.configure_cpu_environment({}, {"vendor": "GenuineIntel", "model": "Xeon", "flags": AVX512}) == {}


def test_cpuinfo_is_read_from_the_first_cpu(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\n"
                    "model name\t: AMD EPYC 7B13\nflags\t\t: fpu avx2 fma\n\n"
                    "processor\t: 1\nvendor_id\t: Other\n", encoding="utf-8")
    assert cpu_env.cpu_info(str(path)) == {"vendor": "AuthenticAMD", "model": "AMD EPYC 7B13", "family_model": "25-1",
                                           "flags": frozenset({"fpu", "avx2", "fma"})}
    assert cpu_env.cpu_info(str(tmp_path / "missing")) == {}


def test_a_cli_sets_it_before_paddle_loads_and_says_so():
    """Through ``run_cli``, as every CLI: the variable is in the environment when Paddle (and MKL)
    loads, and ``-v`` logging names it; on an Intel CPU nothing is set."""
    code = ("import os\nfrom paddlemix.cli_utils import run_cli, setup_logging\n"
            "@run_cli\ndef main():\n    setup_logging(verbose=True)\n    import paddle\n"
            "    print('MKL_DEBUG_CPU_TYPE=' + os.environ.get('MKL_DEBUG_CPU_TYPE', 'unset'))\nmain()\n")
    env = {k: v for k, v in os.environ.items() if k not in ("MKL_DEBUG_CPU_TYPE", "KMP_BLOCKTIME", "IXC2_CPU_TUNING")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    info = cpu_env.cpu_info()
    expected = cpu_env.mkl_cpu_type(str(info.get("vendor", "")), frozenset(info.get("flags", frozenset())))
    assert f"MKL_DEBUG_CPU_TYPE={expected or 'unset'}" in result.stdout
    assert (f"MKL_DEBUG_CPU_TYPE={expected}, so MKL takes its AVX2 path" in result.stderr) == (expected is not None)
    assert ("KMP_BLOCKTIME=0, so MKL's threads do not spin" in result.stderr) == (expected is not None)


def test_a_greedy_chat_runs_under_the_chosen_setting(tiny_model_dir):
    """The setting changes MKL's code path for the whole process: a decode under it must run (the
    value "6" killed a Zen 4 with SIGILL in the first decode step) and give the same ids."""
    code = ("import sys\nfrom paddlemix.cpu_env import configure_cpu_environment\nconfigure_cpu_environment()\n"
            "from paddlemix.models.internlm_xcomposer2 import InternLMXComposer2ForCausalLM as M, "
            "InternLMXComposer2Tokenizer as T\n"
            "m, t = M.from_pretrained(sys.argv[1]), T.from_pretrained(sys.argv[1])\n"
            "print(m.generate_ids(t, 'Hello', do_sample=False, max_new_tokens=8)[0])\n")
    env = {k: v for k, v in os.environ.items() if k not in ("MKL_DEBUG_CPU_TYPE", "KMP_BLOCKTIME", "IXC2_CPU_TUNING")}
    tuned = subprocess.run([sys.executable, "-c", code, str(tiny_model_dir)], capture_output=True, text=True,
                           env=env, timeout=120)
    plain = subprocess.run([sys.executable, "-c", code, str(tiny_model_dir)], capture_output=True, text=True,
                           env={**env, "IXC2_CPU_TUNING": "0"}, timeout=120)
    assert tuned.returncode == 0 and plain.returncode == 0, (tuned.returncode, tuned.stderr[-1500:])
    assert tuned.stdout == plain.stdout


class _FakeLibc:
    def __init__(self, result: int = 1) -> None:
        self.calls, self.result = [], result

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return self.result


def test_the_allocator_setting_leaves_a_users_own_alone(monkeypatch):
    monkeypatch.setattr(cpu_env, "applied", {})
    libc = _FakeLibc()
    assert cpu_env.configure_allocator({}, libc)
    assert libc.calls == [(cpu_env.M_MMAP_MAX, 0), (cpu_env.M_TRIM_THRESHOLD, cpu_env.KEPT_FREE_BYTES)]
    assert "malloc keeps freed memory" in cpu_env.describe_applied()
    for env in ({"IXC2_CPU_TUNING": "0"}, {"MALLOC_MMAP_MAX_": "65536"}, {"MALLOC_TRIM_THRESHOLD_": "0"},
                {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}):
        libc = _FakeLibc()
        assert not cpu_env.configure_allocator(env, libc) and libc.calls == []
    assert not cpu_env.configure_allocator({}, _FakeLibc(result=0))  # refused by the C library
    assert not cpu_env.configure_allocator({}, object())  # no mallopt (not glibc)


# 64 MiB through glibc's malloc, written, freed, and again: the page faults of the second time
_REFAULTS = """
import ctypes, resource
from paddlemix import cpu_env
print(cpu_env.configure_allocator())
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
def touch(n=1 << 26):
    block = libc.malloc(n)
    ctypes.memset(block, 1, n)
    libc.free(block)
touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(cpu_env._glibc() is None, reason="the allocator setting is glibc's")
@pytest.mark.parametrize("opt_out", [False, True])
def test_a_freed_large_block_is_reused_without_faulting_its_pages_in_again(opt_out):
    """64 MiB allocated, freed and allocated again: by default glibc unmaps it and the second one
    faults its 16384 pages in again; with the setting the memory is reused."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "IXC2_CPU_TUNING"}
    if opt_out:
        env["IXC2_CPU_TUNING"] = "0"
    result = subprocess.run([sys.executable, "-c", _REFAULTS], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    done, faults = result.stdout.split()
    assert done == str(not opt_out)
    pages = (1 << 26) // 4096
    assert (int(faults) > pages // 2) if opt_out else (int(faults) < pages // 10), faults
