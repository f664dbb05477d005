"""Ending a multi-process (``paddle.distributed.launch``) run without the native teardown race.

CI has twice seen a 2-process CPU run whose work had all finished (every file written, the final
barrier passed) exit -6 (SIGABRT) with no Python stack in its log: the abort came after Python's
own finalisation, from the C++ destructors of the communication objects (the gloo process
group, the TCP store that rank 0 hosts), which talk to peers that may already be gone. Once a
run is over there is nothing left for them to do, so a finished distributed run ends the way a
normal exit would up to that point (non-daemon threads joined, ``atexit`` handlers, e.g. a reporting integration's final
flush; logging; the standard streams) and then leaves with ``os._exit``, skipping them.
"""
from __future__ import annotations

import atexit
import logging
import os
import sys
import threading

__all__ = ["exit_finished_distributed_run"]

logger = logging.getLogger(__name__)


def exit_finished_distributed_run(code: int = 0) -> None:
    """Call only after the last collective (the final barrier) of a run on several processes."""
    logger.debug("distributed run finished; exiting without native teardown")
    for thread in threading.enumerate():  # as interpreter shutdown does: non-daemon threads finish first
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # what sys.exit would run before finalisation (it runs them once)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed or broken stream: nothing more can be said on it
    os._exit(code)
