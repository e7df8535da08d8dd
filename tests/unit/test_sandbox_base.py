"""The pieces of the sandbox contract every backend shares: path confinement, the output cap, one status."""

from __future__ import annotations

import signal

import pytest

from agentbench_npu.sandbox.base import STATUSES, OutputCap, SandboxError, classify, inside


# -- inside() --------------------------------------------------------------------------------------
@pytest.mark.parametrize("path, normalised", [
    ("a.txt", "a.txt"), ("a/b/c.txt", "a/b/c.txt"), ("./a/./b", "a/b"), ("a/../b", "b"), ("a/b/", "a/b"),
    ("a//b", "a/b"), (".", "."), ("a/..", "."), ("..a/b", "..a/b"), ("a/..b", "a/..b"),
])
def test_paths_inside_the_work_dir_come_back_normalised(path, normalised):
    assert inside(path) == normalised


@pytest.mark.parametrize("path", [
    "..", "../x", "../../etc/passwd", "a/../../x", "a/b/../../../x", "/etc/passwd", "/", "//etc/passwd",
    "/tmp/../etc",
])
def test_paths_that_leave_the_work_dir_are_refused(path):
    with pytest.raises(SandboxError, match="outside the sandbox work dir"):
        inside(path)


@pytest.mark.parametrize("path", ["", "a\x00b"])
def test_empty_paths_and_nul_bytes_are_refused(path):
    with pytest.raises(SandboxError, match="bad sandbox path"):
        inside(path)


# -- OutputCap ---------------------------------------------------------------------------------------
def test_output_under_the_cap_is_kept_whole_per_stream():
    cap = OutputCap(limit=10)
    assert cap.feed("stdout", b"abc") and cap.feed("stderr", b"de")
    assert (bytes(cap.stdout), bytes(cap.stderr), cap.truncated) == (b"abc", b"de", False)


def test_output_exactly_at_the_cap_is_not_truncated():
    cap = OutputCap(limit=4)
    assert cap.feed("stdout", b"abcd")
    assert not cap.truncated


def test_stdout_and_stderr_share_one_budget_and_the_overflow_is_cut_and_reported():
    cap = OutputCap(limit=5)
    assert cap.feed("stderr", b"123")
    assert not cap.feed("stdout", b"abcdef")
    assert (bytes(cap.stderr), bytes(cap.stdout), cap.truncated) == (b"123", b"ab", True)


def test_once_the_budget_is_spent_nothing_more_is_kept():
    cap = OutputCap(limit=2)
    cap.feed("stdout", b"xyz")
    assert not cap.feed("stderr", b"more")
    assert len(cap.stdout) + len(cap.stderr) == 2


def test_text_drops_a_character_the_cut_split_and_never_exceeds_the_limit():
    cap = OutputCap(limit=3)
    cap.feed("stdout", "aé€".encode())  # "a" + 2 bytes of é fit; € is cut
    assert cap.text("stdout") == "aé"
    cap = OutputCap(limit=2)
    cap.feed("stdout", "€".encode())  # the cut leaves 2 of its 3 bytes: nothing whole to show
    assert cap.text("stdout") == ""
    cap = OutputCap(limit=11)
    cap.feed("stdout", ("é" * 10).encode())
    assert len(cap.text("stdout").encode()) <= 11


def test_text_of_uncut_output_replaces_invalid_bytes():
    cap = OutputCap(limit=100)
    cap.feed("stdout", b"ok \xff")
    assert cap.text("stdout") == "ok \ufffd"


# -- classify() -------------------------------------------------------------------------------------
def status(exit_code=0, sig=None, stderr="", *, timed_out=False, truncated=False, cpu_limited=False) -> str:
    return classify(exit_code, sig, stderr, timed_out=timed_out, truncated=truncated, cpu_limited=cpu_limited)[0]


def test_a_clean_exit_is_ok_with_no_detail():
    assert classify(0, None, "", timed_out=False, truncated=False) == ("ok", "")


def test_a_non_zero_exit_is_error_naming_the_code():
    assert classify(3, None, "boom", timed_out=False, truncated=False) == ("error", "exit code 3")


def test_a_signal_is_killed_naming_the_signal():
    assert classify(None, signal.SIGKILL, "", timed_out=False, truncated=False) == ("killed", "killed by signal 9")


@pytest.mark.parametrize("stderr", ["Traceback ...\nMemoryError\n", "bash: fork: Cannot allocate memory\n",
                                    "terminate called after throwing an instance of 'std::bad_alloc'\n"])
def test_running_out_of_memory_is_memory_whatever_the_language(stderr):
    assert status(1, None, stderr) == "memory"
    assert status(None, signal.SIGABRT, stderr) == "memory"


def test_only_the_tail_of_stderr_is_searched_for_memory_errors():
    assert status(1, None, "MemoryError\n" + "x" * 5000) == "error"


def test_a_cpu_limit_is_a_timeout_like_the_wall_limit():
    assert classify(None, signal.SIGXCPU, "", timed_out=False, truncated=False, cpu_limited=True) == (
        "timeout", "CPU-time limit reached")
    assert status(None, signal.SIGKILL, timed_out=True) == "timeout"


def test_truncated_output_wins_over_every_other_cause_then_the_wall_limit():
    assert status(None, signal.SIGKILL, "MemoryError", timed_out=True, truncated=True, cpu_limited=True) == \
        "output_truncated"
    assert status(None, signal.SIGKILL, "MemoryError", timed_out=True, cpu_limited=True) == "timeout"
    assert status(1, None, "MemoryError", cpu_limited=True) == "timeout"


def test_every_status_classify_returns_is_a_contract_status():
    combos = [status(e, s, err, timed_out=t, truncated=tr, cpu_limited=c)
              for e in (0, 1, None) for s in (None, 9) for err in ("", "MemoryError")
              for t in (False, True) for tr in (False, True) for c in (False, True)]
    assert set(combos) <= set(STATUSES)


def test_a_clean_exit_that_mentions_a_handled_memory_error_is_still_ok():
    assert status(0, None, "caught MemoryError, used a smaller buffer\n") == "ok"
