"""A fork server for local runs: import torch, DeepSpeed and the trainer once per sweep.

A fresh `python -m scaling.train` spends ~4 s importing them before its first step; this server
imports them once (running no torch op) and forks one child per rank, which runs
`scaling.train.main` as the command line would. Protocol (JSON lines), children and the measured
gain: docs/sweeps.md ("Local runs", Fork server) and docs/benchmarks.md ("3. Sweep overhead").
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import threading


def _child(request: dict, protocol_fd: int) -> None:
    """In the forked child: become the rank's process, train, and never return."""
    code = 1
    try:
        os.close(protocol_fd)  # the server's reports only: the launcher sees EOF when it ends
        os.setsid()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_DFL)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        log = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        os.close(null)
        sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the process's own fds
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        # imported by serve() before the fork (free here); the launcher, which imports this
        # module for ForkServer, never needs the trainer
        from scaling import clihelp, train

        sys.argv = ["scaling.train", *request["argv"]]
        code = train.main(request["argv"])
        clihelp.exit_now(code)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - reported in the log, then the exit code says it
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    """The server loop: fork on requests from stdin, report forks and exits on stdout."""
    out = os.fdopen(os.dup(1), "w")  # the protocol's channel; stray prints go to stderr
    os.dup2(2, 1)
    os.environ["OMP_NUM_THREADS"] = "1"  # no op runs here; children set their own
    import deepspeed  # noqa: F401 - imported once here, inherited by every child
    import torch._dynamo  # what every torch optimizer imports on first use

    import scaling.engine  # the trainer and its DeepSpeed engine, inherited by every child
    import scaling.train  # noqa: F401

    if torch.cuda.is_initialized():  # a forked child could not use CUDA
        print("fork server: CUDA was initialised by the imports; not forking", file=sys.stderr)
        sys.exit(3)

    def say(message: dict) -> None:
        out.write(json.dumps(message) + "\n")
        out.flush()

    say({"ready": True})
    selector = selectors.DefaultSelector()
    selector.register(sys.stdin, selectors.EVENT_READ)
    children: set[int] = set()
    while True:
        if selector.select(timeout=0.05):
            line = sys.stdin.readline()
            if not line:
                return  # the launcher is gone; children run on in their sessions
            request = json.loads(line)
            pid = os.fork()
            if pid == 0:
                _child(request, out.fileno())
            children.add(pid)
            say({"id": request["id"], "pid": pid})
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            children.discard(pid)
            say({"pid": pid, "exit": os.waitstatus_to_exitcode(status)})


class ForkedProcess:
    """The part of subprocess.Popen that launchers.local uses, for a child of the server."""

    def __init__(self, server: ForkServer, pid: int):
        self.server, self.pid = server, pid

    @property
    def returncode(self) -> int | None:
        code = self.server.exits.get(self.pid)
        if code is None and self.server.dead and not _alive(self.pid):
            return 1  # the server died first: the child's own exit code is lost
        return code

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


class ForkServer:
    """The launcher's handle on a running server (started on first use by `get`)."""

    def __init__(self, log: str | os.PathLike):
        from launchers.slurm import child_env  # late: the server process itself needs none

        env = child_env(dict(os.environ), cpus=None)  # finds the package where we did
        os.makedirs(os.path.dirname(log), exist_ok=True)
        with open(log, "a") as err:  # the server's own messages (imports, errors)
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "launchers.zygote"], env=env, stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=err, text=True,
                start_new_session=True)  # a Ctrl-C reaches the launcher only
        self.exits: dict[int, int] = {}
        self.dead = False
        self._pids: dict[int, int] = {}
        self._changed = threading.Condition()
        self._next = 0
        ready = self.proc.stdout.readline()
        if not ready.strip():
            raise RuntimeError(f"the fork server did not start (exit {self.proc.wait()}; "
                               f"see {log})")
        threading.Thread(target=self._read, name="fork-server", daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            message = json.loads(line)
            with self._changed:
                if "exit" in message:
                    self.exits[message["pid"]] = message["exit"]
                else:
                    self._pids[message["id"]] = message["pid"]
                self._changed.notify_all()
        self.dead = True

    def spawn(self, argv: list[str], *, env: dict, cwd: str, log: str) -> ForkedProcess:
        """Fork a child that runs `python -m scaling.train ARGV` with this environment."""
        with self._changed:
            self._next += 1
            rid = self._next
        request = {"id": rid, "argv": list(argv), "env": dict(env), "cwd": str(cwd),
                   "log": str(log)}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        with self._changed:
            if not self._changed.wait_for(lambda: rid in self._pids or self.dead, timeout=60):
                raise RuntimeError("the fork server did not answer within 60 s")
            if rid not in self._pids:
                raise RuntimeError(f"the fork server exited ({self.proc.poll()})")
            return ForkedProcess(self, self._pids.pop(rid))

    def close(self) -> None:
        """Let the server exit (its children run on)."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass


def enabled() -> bool:
    """Whether local runs use the fork server (VIT_SCALING_FORK_SERVER, default on)."""
    return os.environ.get("VIT_SCALING_FORK_SERVER", "1") != "0"


if __name__ == "__main__":
    serve()
