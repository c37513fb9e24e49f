"""The py-spy summary tells a busy thread from a waiting one and lists where the busy one spent its time."""

import pytest

from benchmarks.spy_summary import is_waiting, main, parse, summary

BOOT = "Thread._bootstrap (threading.py:1030);Thread._bootstrap_inner (threading.py:1073);Thread.run (threading.py:1010)"
POOL = f"{BOOT};_worker (concurrent/futures/thread.py:92);_WorkItem.run (concurrent/futures/thread.py:58)"
PROFILE = f"""\
thread (7): forward_0;{POOL};Embedder.embed (pipelines/embedder.py:172);launch (x.py:3) 60
thread (7): forward_0;{POOL};Embedder.embed (pipelines/embedder.py:172);pool (y.py:9) 20
thread (7): forward_0;{BOOT};_worker (concurrent/futures/thread.py:89) 20
thread (9): loop;{BOOT};UserCallableWrapper.__init__.<locals>._run_user_code_event_loop (replica.py:3746) 95
thread (9): loop;{BOOT};Metric._record (ray/util/metrics.py:133) 5
thread (3): MainThread;Worker.main_loop (ray/_private/worker.py:1069) 100
thread (5) 100
"""


def test_a_thread_pool_worker_between_items_is_waiting_and_inside_one_is_busy():
    assert is_waiting(BOOT.split(";") + ["_worker (concurrent/futures/thread.py:89)"])
    assert not is_waiting(POOL.split(";") + ["launch (x.py:3)"])


def test_blocking_calls_native_loops_and_frameless_threads_count_as_waiting():
    assert is_waiting(["Condition.wait (threading.py:359)"])
    assert is_waiting(["BaseSelector.select (selectors.py:468)"])
    assert is_waiting(["Worker.main_loop (ray/_private/worker.py:1069)"])
    assert is_waiting(BOOT.split(";"))
    assert is_waiting([])
    assert not is_waiting(["Metric._record (ray/util/metrics.py:133)"])


def test_each_threads_busy_share_is_its_busy_samples_over_all_of_its_samples():
    threads = parse(PROFILE)
    assert threads["thread (7): forward_0"].busy_share == pytest.approx(0.8)
    assert threads["thread (9): loop"].busy_share == pytest.approx(0.05)
    assert threads["thread (3): MainThread"].busy_share == 0
    assert threads["thread (5)"].samples == 100


def test_the_summary_lists_the_chosen_threads_functions_by_inclusive_share():
    text = summary(parse(PROFILE), thread="forward")
    assert text.splitlines()[1].startswith("80.0%") and "forward_0" in text.splitlines()[1]
    assert " 75.0%  launch (x.py:3)" in text
    assert " 25.0%  pool (y.py:9)" in text
    assert "100.0%  Embedder.embed (pipelines/embedder.py:172)" in text


def test_the_summary_says_so_when_no_thread_matches():
    assert "no thread's label contains 'nothing'" in summary(parse(PROFILE), thread="nothing")


def test_a_line_that_is_not_a_raw_profile_line_is_refused():
    with pytest.raises(ValueError, match="not a py-spy raw line"):
        parse("thread (7): forward_0;launch (x.py:3) many\n")


def test_the_command_prints_the_summary(tmp_path, capsys):
    path = tmp_path / "model.txt"
    path.write_text(PROFILE)
    assert main([str(path), "--top", "2"]) == 0
    out = capsys.readouterr().out
    functions = out.split("inclusive):\n", 1)[1].splitlines()
    assert len(functions) == 2 and all(line.startswith("100.0%  ") for line in functions)
    assert "Thread.run" not in out.split("inclusive):")[1]
