"""`Threads.map`: parts side by side; a map inside a part runs on that part's thread; an error
is raised only after every part has ended."""

from __future__ import annotations

import threading
import time

import pytest

from statemesh.worker.kernels.threads import Threads


def test_parts_run_side_by_side_and_a_map_inside_one_runs_on_its_thread() -> None:
    threads = Threads(2)
    met = threading.Barrier(2, timeout=10)  # both parts must be running at once to pass it

    def part(name: str) -> tuple[str, bool, list[str]]:
        met.wait()
        mine = threading.current_thread().name
        inner = threads.map(lambda i: threading.current_thread().name, [(0,), (1,)])
        return name, threads.inside, [mine, *inner]

    got: list[list[tuple[str, bool, list[str]]]] = []
    caller = threading.Thread(target=lambda: got.append(threads.map(part, [("a",), ("b",)])), daemon=True)
    caller.start()
    caller.join(timeout=10)
    assert got, "the map did not end: an inner map waited for the pool its own part holds"
    results = got[0]
    assert [r[0] for r in results] == ["a", "b"] and all(r[1] for r in results)
    for _, _, (mine, *inner) in results:
        assert inner == [mine, mine]  # the inner map stayed on the part's own thread
    assert results[0][2][0] != results[1][2][0]
    assert not threads.inside
    threads.close()


def test_an_error_in_one_part_is_raised_after_the_others_end() -> None:
    threads = Threads(2)
    ended = threading.Event()

    def part(fail: bool) -> None:
        if fail:
            raise ValueError("part failed")
        time.sleep(0.2)
        ended.set()

    with pytest.raises(ValueError, match="part failed"):
        threads.map(part, [(True,), (False,)])
    assert ended.is_set()  # the caller went on only once the slow part was done
    threads.close()
