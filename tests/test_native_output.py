"""Descriptor 1 and sys.stdout are the process's: redirecting them from two threads at once must
leave both as they were (the web app reloads an index while a new ONNX session starts)."""

from __future__ import annotations

import os
import sys
import threading

from simsiam_embed.native_output import stdout_redirected


def test_blocks_on_two_threads_leave_stdout_as_it_was(capfd):
    original_stdout = sys.stdout
    original_target = os.readlink("/proc/self/fd/1") if os.path.exists("/proc/self/fd/1") else None
    failures: list[BaseException] = []
    start = threading.Barrier(2)

    def redirect_many_times(discard: bool) -> None:
        try:
            start.wait()
            for _ in range(300):
                with stdout_redirected(discard=discard):
                    print("inside", end="")   # writes to whatever sys.stdout is now: must be open
        except BaseException as error:   # noqa: BLE001 - the test reports any failure below
            failures.append(error)

    threads = [threading.Thread(target=redirect_many_times, args=(discard,)) for discard in (True, False)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert failures == []
    assert sys.stdout is original_stdout
    assert not sys.stdout.closed
    if original_target is not None:
        assert os.readlink("/proc/self/fd/1") == original_target
    print("after")
    assert capfd.readouterr().out.endswith("after\n")
