"""Sandboxed execution: every way a generated program can misbehave is contained and reported."""

from __future__ import annotations

import os
import time

import pytest

from cora.execution import ExecutionConfig, _count_processes, run_program, run_programs, sandbox_capabilities

FAST = ExecutionConfig(timeout_s=3.0)
CAPABILITIES = sandbox_capabilities()
needs_privilege_drop = pytest.mark.skipif(
    not CAPABILITIES.privileges_dropped, reason="needs root and setpriv to run programs as nobody"
)
needs_pid_namespace = pytest.mark.skipif(not CAPABILITIES.pid_namespace, reason="needs a PID namespace (unshare --pid)")


def wait_for_no_processes(uid: int, seconds: float = 5.0) -> int:
    """Wait until user ``uid`` runs no processes (namespace teardown is asynchronous); return the count left."""
    deadline = time.monotonic() + seconds
    while (count := _count_processes(uid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return count


def test_passing_program_passes():
    result = run_program("assert sorted([3, 1, 2]) == [1, 2, 3]\nprint('done')", FAST)
    assert result.passed
    assert result.status == "passed"
    assert result.stdout == "done\n"


def test_failed_assert_reports_assertion_error():
    result = run_program("assert 1 + 1 == 3, 'wrong sum'", FAST)
    assert not result.passed
    assert result.status == "failed"
    assert result.reason == "AssertionError: wrong sum"


def test_syntax_error_is_reported():
    result = run_program("def broken(:\n    return 1\n", FAST)
    assert result.status == "syntax_error"
    assert "SyntaxError" in result.reason


def test_failed_import_is_reported():
    result = run_program("import module_that_does_not_exist", FAST)
    assert result.status == "failed"
    assert "ModuleNotFoundError" in result.reason


def test_infinite_loop_times_out():
    started = time.monotonic()
    result = run_program("while True:\n    pass\n", ExecutionConfig(timeout_s=1.0))
    assert result.status == "timed_out"
    assert time.monotonic() - started < 6.0


def test_sys_exit_zero_is_not_a_pass():
    result = run_program("import sys\nsys.exit(0)\nassert False", FAST)
    assert not result.passed
    assert result.status == "exited"


def test_os_exit_zero_is_not_a_pass():
    result = run_program("import os\nos._exit(0)\nassert False", FAST)
    assert not result.passed
    assert result.status == "exited"


def test_printed_token_guess_is_not_a_pass():
    result = run_program("print('0' * 32)\nimport os\nos._exit(0)", FAST)
    assert not result.passed


def test_huge_output_is_capped():
    config = ExecutionConfig(timeout_s=5.0, max_output_bytes=10_000)
    result = run_program("while True:\n    print('x' * 1000)\n", config)
    assert result.status == "output_limit"
    assert len(result.stdout) + len(result.stderr) <= 10_000


def test_memory_limit_stops_large_allocation():
    result = run_program("block = bytearray(8 << 30)", ExecutionConfig(timeout_s=5.0, memory_bytes=512 << 20))
    assert result.status == "failed"
    assert "MemoryError" in result.reason


def test_program_runs_in_its_own_temporary_directory():
    result = run_program("import os\nopen('scratch.txt', 'w').write('x')\nprint(os.getcwd())", FAST)
    workdir = result.stdout.strip()
    assert os.path.basename(workdir).startswith("cora-exec-")
    assert not os.path.exists(workdir)  # deleted after the run


@pytest.mark.skipif(not CAPABILITIES.network_isolated, reason="needs a network namespace (unshare --net)")
def test_network_is_unreachable():
    program = "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=2)"
    result = run_program(program, FAST)
    assert result.status == "failed"
    assert "Network is unreachable" in result.reason


@needs_privilege_drop
def test_program_runs_as_nobody():
    result = run_program("import os\nprint(os.getuid())", FAST)
    assert result.stdout.strip() == str(CAPABILITIES.sandbox_uid)


@needs_privilege_drop
def test_cannot_delete_files_outside_its_directory(tmp_path):
    victim = tmp_path / "keep" / "data.txt"
    victim.parent.mkdir()
    victim.write_text("precious")
    os.chmod(tmp_path, 0o755)
    result = run_program(f"import shutil\nshutil.rmtree({str(victim.parent)!r})", FAST)
    assert result.status == "failed"
    assert "PermissionError" in result.reason
    assert victim.read_text() == "precious"


@needs_privilege_drop
def test_cannot_write_into_project_tree():
    target = os.path.join(os.path.dirname(__file__), "written_by_sandbox.txt")
    result = run_program(f"open({target!r}, 'w').write('x')", FAST)
    assert "PermissionError" in result.reason
    assert not os.path.exists(target)


@needs_privilege_drop
def test_process_limit_stops_forking():
    program = (
        "import os, time\n"
        "children = 0\n"
        "try:\n"
        "    for _ in range(500):\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(30)\n"
        "            os._exit(0)\n"
        "        children += 1\n"
        "except OSError:\n"
        "    print(children)\n"
    )
    result = run_program(program, ExecutionConfig(timeout_s=5.0, max_processes=16))
    assert result.passed
    assert 0 < int(result.stdout) < 16
    assert wait_for_no_processes(CAPABILITIES.sandbox_uid) == 0


@needs_privilege_drop
@needs_pid_namespace
def test_fork_bomb_is_contained():
    bomb = "import os\nwhile True:\n    try:\n        if os.fork() == 0:\n            os.setsid()\n    except OSError:\n        pass\n"
    result = run_program(bomb, ExecutionConfig(timeout_s=2.0, max_processes=32))
    assert result.status == "timed_out"
    assert wait_for_no_processes(CAPABILITIES.sandbox_uid) == 0


@needs_privilege_drop
@needs_pid_namespace
def test_detached_child_dies_with_program():
    program = "import subprocess\nsubprocess.Popen(['sleep', '60'], start_new_session=True)\nprint('started')"
    result = run_program(program, FAST)
    assert result.passed
    assert wait_for_no_processes(CAPABILITIES.sandbox_uid) == 0


def test_run_programs_keeps_input_order():
    results = run_programs([f"assert {i} % 2 == 0" for i in range(6)], FAST, workers=2, progress=False)
    assert [result.passed for result in results] == [True, False, True, False, True, False]


def test_config_rejects_zero_timeout():
    with pytest.raises(ValueError, match="invalid timeout_s 0"):
        ExecutionConfig(timeout_s=0)


def test_config_rejects_tiny_memory_limit():
    with pytest.raises(ValueError, match="invalid memory_bytes 1000"):
        ExecutionConfig(memory_bytes=1000)
