"""Sandboxed execution of generated Python code, for pass@k on code tasks.

Generated code never runs in the evaluator's process. Each program runs in a
child process with these protections, as far as the system allows them:

* a fresh temporary working directory, deleted afterwards, as ``HOME`` and ``TMPDIR``;
* a wall-clock timeout, after which the whole process group is killed;
* resource limits set before the program starts: address space (``RLIMIT_AS``),
  processes (``RLIMIT_NPROC``), CPU seconds, size of written files, no core dumps;
* captured stdout and stderr capped in bytes (the program is killed beyond the cap);
* Linux namespaces through util-linux ``unshare``: a new network namespace with
  no interfaces but a downed loopback (no network), and a new PID namespace, so
  every process the program starts dies with it, even one that called ``setsid``;
* when the evaluator runs as root: the program runs as ``nobody`` (through
  util-linux ``setpriv``). It can then write or delete files only in its
  directory and in world-writable places such as ``/tmp``. ``RLIMIT_NPROC``
  applies too, which the kernel does not enforce for root.

:func:`sandbox_capabilities` reports which of these work here. Without root, a
program runs as the evaluator's own user and can delete that user's files; the
namespaces are then tried through an unprivileged user namespace.

A program passes only when it runs to its end: the runner prints a random token
after the program's last statement, so ``sys.exit(0)`` or ``os._exit(0)`` in
generated code counts as a failure.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

SANDBOX_USER = "nobody"
PROGRAM_NAME = "program.py"
RUNNER_NAME = "runner.py"
PROBE_TIMEOUT_SECONDS = 10.0

# Exit codes the runner uses to report how the program ended.
EXIT_EXCEPTION = 1
EXIT_SYNTAX_ERROR = 3
EXIT_SYSTEM_EXIT = 4

# The runner, run by the sandboxed interpreter. It lowers its own resource limits
# (allowed without privileges), reads the pass token from stdin before the
# program can run, and executes the program in a fresh namespace.
RUNNER_SOURCE = r'''
import json, os, resource, sys, traceback

limits = json.loads(sys.argv[1])
for name, value in limits.items():
    resource.setrlimit(getattr(resource, name), (value, value))
token = sys.stdin.readline().strip()
sys.stdin.close()

with open(sys.argv[2], encoding="utf-8") as stream:
    source = stream.read()
try:
    code = compile(source, sys.argv[2], "exec")
except (SyntaxError, ValueError):
    traceback.print_exc(limit=0)
    sys.stderr.flush()
    os._exit(%(syntax)d)

try:
    exec(code, {"__name__": "__main__", "__file__": sys.argv[2], "__builtins__": __builtins__})
except SystemExit as error:
    sys.stderr.write(f"SystemExit: the program called sys.exit({error.code!r}) before its end\n")
    sys.stderr.flush()
    os._exit(%(system_exit)d)
except BaseException:
    traceback.print_exc()
    sys.stderr.flush()
    os._exit(%(exception)d)
sys.stdout.flush()
sys.stdout.write("\n" + token + "\n")
sys.stdout.flush()
os._exit(0)
''' % {"syntax": EXIT_SYNTAX_ERROR, "system_exit": EXIT_SYSTEM_EXIT, "exception": EXIT_EXCEPTION}


@dataclass(frozen=True)
class ExecutionConfig:
    """Limits for one sandboxed program."""

    timeout_s: float = 10.0  # wall-clock seconds before the process group is killed
    memory_bytes: int = 2 << 30  # address-space limit (RLIMIT_AS), bytes
    max_processes: int = 64  # processes the sandbox user may run (RLIMIT_NPROC), on top of existing ones
    max_output_bytes: int = 1 << 20  # stdout + stderr captured, bytes; the program is killed beyond it
    max_file_bytes: int = 16 << 20  # largest file the program may write (RLIMIT_FSIZE), bytes
    isolate_network: bool = True  # run in a network namespace without interfaces, when the system allows it
    drop_privileges: bool = True  # as root: run the program as `nobody`
    python: str = sys.executable  # interpreter that runs the program

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"invalid timeout_s {self.timeout_s}; expected seconds above 0")
        for name in ("memory_bytes", "max_processes", "max_output_bytes", "max_file_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"invalid {name} {value!r}; expected a positive integer")
        if self.memory_bytes < 64 << 20:
            raise ValueError(f"invalid memory_bytes {self.memory_bytes}; the interpreter needs at least 64 MiB")


@dataclass(frozen=True)
class ExecutionResult:
    """How one program ended."""

    passed: bool  # ran to its end with exit status 0
    status: str  # passed | failed | syntax_error | exited | timed_out | output_limit | killed | sandbox_error
    reason: str  # one line: the exception, the exit code or the limit that stopped it
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float  # wall-clock time of the run


@dataclass(frozen=True)
class SandboxCapabilities:
    """Protections that work on this system, found by running probe programs once."""

    namespace_prefix: tuple[str, ...]  # the unshare command that wraps each program, empty if none works
    privilege_prefix: tuple[str, ...]  # the setpriv command that drops root, empty if not used
    sandbox_uid: int | None  # user id the program runs as when privileges are dropped

    @property
    def network_isolated(self) -> bool:
        return "--net" in self.namespace_prefix

    @property
    def pid_namespace(self) -> bool:
        return "--pid" in self.namespace_prefix

    @property
    def privileges_dropped(self) -> bool:
        return bool(self.privilege_prefix)


STDLIB_PROBE = "import json, os; print(os.path.dirname(os.__file__))"


def _probe(command: list[str], python: str, expected_stdlib: str) -> bool:
    """Run the interpreter under ``command``; True when it starts and imports its own standard library.

    An interpreter that cannot read its installation may still start with another
    Python's standard library (found under /usr/lib), which the probe rejects.
    """
    try:
        completed = subprocess.run(
            [*command, python, "-I", "-c", STDLIB_PROBE],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_SECONDS,
            cwd="/",
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return completed.returncode == 0 and completed.stdout.strip() == expected_stdlib


def _stdlib_dir(python: str) -> str:
    try:
        completed = subprocess.run(
            [python, "-I", "-c", STDLIB_PROBE], capture_output=True, text=True, timeout=PROBE_TIMEOUT_SECONDS
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise RuntimeError(f"could not run the interpreter {python!r}: {error}; set ExecutionConfig.python") from error
    if completed.returncode != 0:
        raise RuntimeError(f"interpreter {python!r} failed to start: {completed.stderr.strip()}")
    return completed.stdout.strip()


def _namespace_candidates(isolate_network: bool) -> list[list[str]]:
    if shutil.which("unshare") is None:
        return []
    network = ["--net"] if isolate_network else []
    as_root = ["unshare", *network, "--pid", "--fork", "--kill-child"]
    as_user = ["unshare", "--user", "--map-root-user", *network, "--pid", "--fork", "--kill-child"]
    return [as_root, as_user] if os.geteuid() == 0 else [as_user]


def _privilege_candidates(uid: int, gid: int) -> list[list[str]]:
    base = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--no-new-privs"]
    # Without the capability first. CAP_DAC_READ_SEARCH lets the program read (not write) any file.
    # It is needed when the interpreter lies in a folder that `nobody` cannot enter, such as /root.
    read_anywhere = [
        "--inh-caps=-all,+dac_read_search",
        "--ambient-caps=+dac_read_search",
        "--bounding-set=-all,+dac_read_search",
    ]
    return [[*base, "--inh-caps=-all", "--bounding-set=-all"], [*base, *read_anywhere]]


@functools.lru_cache(maxsize=None)
def sandbox_capabilities(isolate_network: bool = True, drop_privileges: bool = True, python: str = sys.executable) -> SandboxCapabilities:
    """Find, once per setting, which namespaces and privilege drop work on this system."""
    stdlib = _stdlib_dir(python)
    namespace_prefix: list[str] = []
    for candidate in _namespace_candidates(isolate_network):
        if _probe(candidate, python, stdlib):
            namespace_prefix = candidate
            break

    privilege_prefix: list[str] = []
    sandbox_uid = None
    if drop_privileges and os.geteuid() == 0 and shutil.which("setpriv") is not None:
        user = pwd.getpwnam(SANDBOX_USER)
        for candidate in _privilege_candidates(user.pw_uid, user.pw_gid):
            if _probe([*namespace_prefix, *candidate], python, stdlib):
                privilege_prefix, sandbox_uid = candidate, user.pw_uid
                break

    capabilities = SandboxCapabilities(tuple(namespace_prefix), tuple(privilege_prefix), sandbox_uid)
    logger.info(
        "sandbox: network isolated %s, PID namespace %s, runs as %s",
        capabilities.network_isolated,
        capabilities.pid_namespace,
        SANDBOX_USER if capabilities.privileges_dropped else "the current user",
    )
    if isolate_network and not capabilities.network_isolated:
        logger.warning("sandbox: no network namespace available (unshare failed); programs keep network access")
    if drop_privileges and os.geteuid() == 0 and not capabilities.privileges_dropped:
        logger.warning("sandbox: could not drop root privileges (setpriv missing or failed); programs run as root")
    return capabilities


def _count_processes(uid: int) -> int:
    """Count the processes that user ``uid`` runs now (from /proc; 0 where /proc is absent)."""
    count = 0
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if entry.isdigit():
            try:
                count += os.stat(f"/proc/{entry}").st_uid == uid
            except OSError:
                continue  # the process ended while we looked
    return count


def _resource_limits(config: ExecutionConfig, run_uid: int) -> dict[str, int]:
    # RLIMIT_NPROC counts every process of the user, so the sandbox gets its share on top of the current count.
    cpu_seconds = int(config.timeout_s) + 1
    return {
        "RLIMIT_AS": config.memory_bytes,
        "RLIMIT_NPROC": _count_processes(run_uid) + config.max_processes,
        "RLIMIT_CPU": cpu_seconds,
        "RLIMIT_FSIZE": config.max_file_bytes,
        "RLIMIT_CORE": 0,
    }


class _OutputReader(threading.Thread):
    """Drain one pipe into a buffer, calling ``on_overflow`` once the shared byte budget runs out.

    The reader owns the stream and closes it at end of file.
    """

    def __init__(self, stream, budget: list[int], lock: threading.Lock, on_overflow) -> None:
        super().__init__(daemon=True)
        self.stream, self.budget, self.lock, self.on_overflow = stream, budget, lock, on_overflow
        self.data = bytearray()

    def run(self) -> None:
        with self.stream:
            while chunk := self.stream.read1(1 << 16):
                with self.lock:
                    keep = min(len(chunk), self.budget[0])
                    self.budget[0] -= keep
                    overflow = keep < len(chunk)
                self.data += chunk[:keep]
                if overflow:
                    self.on_overflow()


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone already


def run_program(source: str, config: ExecutionConfig | None = None) -> ExecutionResult:
    """Run Python ``source`` in the sandbox and report how it ended.

    Whatever the program does is reported in the result, not raised. A sandbox
    that cannot start gives status ``sandbox_error``.
    """
    config = config or ExecutionConfig()
    capabilities = sandbox_capabilities(config.isolate_network, config.drop_privileges, config.python)
    workdir = tempfile.mkdtemp(prefix="cora-exec-")
    try:
        return _run_in(workdir, source, config, capabilities)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _run_in(workdir: str, source: str, config: ExecutionConfig, capabilities: SandboxCapabilities) -> ExecutionResult:
    program_path = os.path.join(workdir, PROGRAM_NAME)
    runner_path = os.path.join(workdir, RUNNER_NAME)
    with open(program_path, "w", encoding="utf-8") as stream:
        stream.write(source)
    with open(runner_path, "w", encoding="utf-8") as stream:
        stream.write(RUNNER_SOURCE)
    run_uid = os.getuid()
    if capabilities.sandbox_uid is not None:
        run_uid = capabilities.sandbox_uid
        for path in (workdir, program_path, runner_path):
            os.chown(path, run_uid, -1)
    os.chmod(workdir, 0o700)

    limits = _resource_limits(config, run_uid)
    command = [
        *capabilities.namespace_prefix,
        *capabilities.privilege_prefix,
        config.python, "-I", "-B", runner_path, json.dumps(limits), program_path,
    ]  # fmt: skip
    environment = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "PYTHONIOENCODING": "utf-8",
    }
    token = secrets.token_hex(16)
    started = time.monotonic()
    try:
        process = subprocess.Popen(
            command,
            cwd=workdir,
            env=environment,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # own process group, killed as a whole
        )
    except OSError as error:
        logger.error("sandbox failed to start %s: %s", command[0], error)
        return ExecutionResult(False, "sandbox_error", f"could not start the sandbox: {error}", None, "", "", 0.0)
    return _supervise(process, token, config, started)


def _supervise(process: subprocess.Popen, token: str, config: ExecutionConfig, started: float) -> ExecutionResult:
    overflowed = threading.Event()

    def on_overflow() -> None:
        overflowed.set()
        _kill_group(process)

    budget, lock = [config.max_output_bytes], threading.Lock()
    readers = [_OutputReader(stream, budget, lock, on_overflow) for stream in (process.stdout, process.stderr)]
    for reader in readers:
        reader.start()
    try:
        process.stdin.write(f"{token}\n".encode())
        process.stdin.close()
    except BrokenPipeError:
        pass  # the runner died before reading the token; its exit status shows why

    timed_out = False
    try:
        process.wait(timeout=config.timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
    _kill_group(process)
    process.wait()
    for reader in readers:
        reader.join(timeout=5.0)  # a process that escaped the group may hold the pipe open
    seconds = time.monotonic() - started

    stdout = readers[0].data.decode("utf-8", errors="replace")
    stderr = readers[1].data.decode("utf-8", errors="replace")
    finished = process.returncode == 0 and stdout.rstrip().endswith(token)
    if finished:
        stdout = stdout.rstrip()[: -len(token)].removesuffix("\n")
    status, reason = _classify(process.returncode, finished, timed_out, overflowed.is_set(), stderr, config)
    return ExecutionResult(status == "passed", status, reason, process.returncode, stdout, stderr, seconds)


def _classify(
    returncode: int, finished: bool, timed_out: bool, overflowed: bool, stderr: str, config: ExecutionConfig
) -> tuple[str, str]:
    last_line = next((line for line in reversed(stderr.splitlines()) if line.strip()), "")
    if overflowed:
        return "output_limit", f"output exceeded {config.max_output_bytes} bytes"
    if timed_out:
        return "timed_out", f"timed out after {config.timeout_s:g} s"
    if finished:
        return "passed", "passed"
    if returncode == EXIT_SYNTAX_ERROR:
        return "syntax_error", last_line or "syntax error"
    if returncode == EXIT_SYSTEM_EXIT:
        return "exited", last_line
    if returncode == EXIT_EXCEPTION:
        return "failed", last_line or "exception"
    if returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
        return "killed", f"killed by signal {name} (a resource limit, or the program itself)"
    return "exited", f"the program exited with status {returncode} before its end"


def run_programs(
    sources: list[str], config: ExecutionConfig | None = None, workers: int = 2, progress: bool = True
) -> list[ExecutionResult]:
    """Run several programs in the sandbox, ``workers`` at a time, results in input order."""
    if workers < 1:
        raise ValueError(f"invalid workers {workers}; expected a positive integer")
    config = config or ExecutionConfig()
    sandbox_capabilities(config.isolate_network, config.drop_privileges, config.python)  # probe once, not per thread
    with ThreadPoolExecutor(max_workers=workers) as pool:
        iterator = pool.map(lambda source: run_program(source, config), sources)
        return list(tqdm(iterator, total=len(sources), desc="executing", unit="program", disable=not progress))
