"""A finished distributed run leaves through ``exit_finished_distributed_run``: what a normal
exit does first (non-daemon threads, atexit handlers, logging, the streams) happens; the code is kept."""
from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO_ROOT

SCRIPT = """
import atexit, logging, sys, threading, time
from paddlemix.finetune.process_exit import exit_finished_distributed_run
atexit.register(lambda: open(sys.argv[1], "w").write("flushed by atexit"))
threading.Thread(target=lambda: (time.sleep(0.3), open(sys.argv[3], "w").write("joined"))).start()
handler = logging.FileHandler(sys.argv[2], delay=True)
logging.getLogger("probe").addHandler(handler)
logging.getLogger("probe").warning("last log line")
sys.stdout.write("buffered, no newline")
exit_finished_distributed_run(3)
print("never reached")
"""


def test_exit_runs_atexit_flushes_logs_and_streams_and_keeps_the_code(tmp_path):
    marker, log, joined = tmp_path / "atexit.txt", tmp_path / "run.log", tmp_path / "thread.txt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout to a pipe stays buffered
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(marker), str(log), str(joined)], capture_output=True, text=True,
                            cwd=REPO_ROOT, timeout=120, env=env)
    assert result.returncode == 3, result.stderr[-2000:]
    assert result.stdout == "buffered, no newline"
    assert marker.read_text() == "flushed by atexit" and log.read_text() == "last log line\n"
    assert joined.read_text() == "joined"  # a non-daemon thread finished first, as at a normal exit
