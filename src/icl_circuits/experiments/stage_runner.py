"""Running a recipe's stages: in order in this process, or side by side as child processes (`--jobs`)."""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from icl_circuits.experiments.recipe import Stage, _deps

if TYPE_CHECKING:
    from icl_circuits.experiments.reproduce import ReproduceConfig


class _Runner:
    """Runs stages in recipe order (jobs=1, in this process) or side by side in subprocesses (jobs>1)."""

    def __init__(self, cfg: ReproduceConfig, out: Path, run_command: Callable[[list[str]], int] | None) -> None:
        self.cfg, self.out = cfg, out
        self.run_command = run_command

    def run(self, stages: list[Stage], argvs: dict[str, list[str]], finish: Callable[[Stage, float, int | None], None]) -> None:
        if self.cfg.jobs == 1:
            for st in stages:
                _say(self.cfg, f"[{st.name}] {st.section} {st.title}\n  icl-circuits {' '.join(argvs[st.name])}")
                t0 = time.perf_counter()
                try:
                    rc = (self.run_command or _run_cli)(argvs[st.name])
                except BaseException:  # Ctrl-C or a crash: the attempt's time still counts, the stage stays unfinished
                    finish(st, time.perf_counter() - t0, None)
                    raise
                finish(st, time.perf_counter() - t0, rc)
            return
        pending = list(stages)
        names = {st.name for st in stages}
        running: dict[str, tuple[Stage, float, Any]] = {}  # name -> (stage, start time, process)
        failed: StageFailed | None = None
        try:
            while pending or running:
                started_or_done = names - {s.name for s in pending} - set(running)
                while failed is None and len(running) < self.cfg.jobs:
                    ready = next((s for s in pending if _deps(s) & names <= started_or_done), None)
                    if ready is None:
                        break
                    pending.remove(ready)
                    _say(self.cfg, f"[{ready.name}] started: icl-circuits {' '.join(argvs[ready.name])} (log: {self.out / (ready.name + '.log')})")
                    running[ready.name] = (ready, time.perf_counter(), self._start(ready, argvs[ready.name]))
                if not running:
                    break  # a failure stopped new launches
                time.sleep(0.1)
                for name, (st, t0, proc) in list(running.items()):
                    rc = proc.poll()
                    if rc is None:
                        continue
                    del running[name]
                    try:
                        finish(st, time.perf_counter() - t0, rc)
                    except StageFailed as e:  # let the running stages finish; start nothing new
                        failed = failed or e
        except BaseException:  # Ctrl-C / SIGTERM: stop the children (their commands resume what they finished)
            for st, t0, proc in running.values():
                proc.stop()
                finish(st, time.perf_counter() - t0, None)
            raise
        if failed is not None:
            raise failed

    def _start(self, st: Stage, argv: list[str]) -> "_Process | _Thread":
        if self.run_command is not None:
            return _Thread(self.run_command, argv)
        return _Process(argv, self.out / f"{st.name}.log")


class _Process:
    """A stage's command in its own process, its output in a log file."""

    def __init__(self, argv: list[str], log: Path) -> None:
        import subprocess

        self.log = log.open("w")
        self.proc = subprocess.Popen([sys.executable, "-m", "icl_circuits.cli", *argv], stdout=self.log, stderr=subprocess.STDOUT)

    def poll(self) -> int | None:
        rc = self.proc.poll()
        if rc is not None:
            self.log.close()
        return rc

    def stop(self) -> None:
        import subprocess

        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


class _Thread:
    """A stage run by a Python callable in a thread (tests); poll() like a process."""

    def __init__(self, fn: Callable[[list[str]], int], argv: list[str]) -> None:
        import threading

        self.rc: int | None = None
        self.thread = threading.Thread(target=self._run, args=(fn, argv), daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[[list[str]], int], argv: list[str]) -> None:
        try:
            self.rc = fn(argv)
        except Exception:  # noqa: BLE001 - reported as a failed stage
            self.rc = 1

    def poll(self) -> int | None:
        return None if self.thread.is_alive() else self.rc

    def stop(self) -> None:
        pass  # a thread cannot be stopped; it is a daemon


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt while the stages run (main thread only; restored afterwards)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


class StageFailed(RuntimeError):
    """A stage's command returned a non-zero exit code."""



def _run_cli(argv: list[str]) -> int:
    from icl_circuits.cli import main

    return main(argv)


def _say(cfg: "ReproduceConfig", text: str) -> None:
    if cfg.progress:
        print(text, file=sys.stderr, flush=True)
