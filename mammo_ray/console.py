"""What a person sees on the terminal: one progress line per job, and Ray's chatter in a file.

Ray Data prints a block of operator states every few seconds (``logging_progress``), Tune
repeats "Experiment state snapshotting..." warnings, and both drown the lines a user needs.
:func:`setup_logging` keeps mammo-ray's own records on the console (at ``--log-level``, or
warnings only with ``--quiet``), lifts Ray's console handlers to warnings, and writes every
record of both, at DEBUG, to one log file whose path the CLI prints first.

:class:`Progress` is the job's line: done/total, errors, images/s and an ETA, rewritten in
place on a terminal and printed every ``interval`` seconds otherwise (a log file or CI). Ray
Data's own progress bars are off outside a terminal, so this line is written here from the
status rows the driver receives. No Ray import: the CLI calls this before any job starts.
"""
from __future__ import annotations

import logging
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, TextIO

logger = logging.getLogger("mammo_ray.progress")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
#: Ray's loggers: console handlers raised to WARNING (Tune's snapshot warnings: ERROR), all to the file
RAY_LOGGERS = {"ray": logging.WARNING, "ray.data": logging.ERROR, "ray.tune": logging.ERROR,
               "ray.train": logging.WARNING, "ray.air": logging.ERROR}
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_console_level = logging.INFO  # what setup_logging set; Tune's own trial tables only at DEBUG
_quiet = False  # setup_logging's quiet, for quiet_ray's later calls (after Ray's imports)


def ray_verbose() -> bool:
    """Whether Ray's own progress output (Tune's trial tables) belongs on the console (-v)."""
    return _console_level <= logging.DEBUG


def default_log_dir() -> Path:
    """``$MAMMO_RAY_LOG_DIR``, else ``$XDG_STATE_HOME/mammo-ray/logs`` (``~/.local/state/...``)."""
    if os.environ.get("MAMMO_RAY_LOG_DIR"):
        return Path(os.environ["MAMMO_RAY_LOG_DIR"]).expanduser()
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "mammo-ray" / "logs"


def setup_logging(command: str, *, level: str = "INFO", quiet: bool = False, log_dir: str | os.PathLike | None = None,
                  stream: TextIO | None = None) -> Path:
    """Console at ``level`` (WARNING with ``quiet``) for mammo-ray's records, Ray's consoles at
    warnings, and everything at DEBUG in ``<log_dir>/<command>-<time>-<pid>.log``. Returns the
    log file's path. Called again (the demo's stages, tests), it replaces what it set before."""
    if level.upper() not in LOG_LEVELS:
        raise ValueError(f"--log-level {level!r}: use one of {', '.join(LOG_LEVELS)}")
    folder = Path(log_dir) if log_dir is not None else default_log_dir()
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    path, n = folder / f"{stem}.log", 1
    while path.exists():  # two runs in one process within a second (the demo's, tests') get two files
        n += 1
        path = folder / f"{stem}-{n}.log"
    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setLevel(logging.DEBUG)
    file_handler.setFormatter(logging.Formatter(FORMAT))
    file_handler._mammo_ray = True  # type: ignore[attr-defined]  # ours: replaced on the next call
    global _console_level, _quiet
    _console_level = logging.WARNING if quiet else getattr(logging, level.upper())
    _quiet = quiet
    console = logging.StreamHandler(stream or sys.stderr)
    console.setLevel(_console_level)
    console.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    console._mammo_ray = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "_mammo_ray", False)]:
        root.removeHandler(h)
    root.setLevel(logging.DEBUG)
    root.addHandler(console)
    root.addHandler(file_handler)
    quiet_ray(file_handler, quiet=quiet)
    return path


def route_native_stderr(log_file: str | os.PathLike) -> None:
    """Point file descriptor 2 at ``log_file`` and keep Python's ``sys.stderr`` (the console
    handler, progress lines, errors) on the terminal.

    Ray's C++ core writes some warnings straight to fd 2, past Python's logging, for example
    ``core_worker.cc``'s "constructor arguments in the object store" for every Ray Data actor
    pool (ray-project/ray#53727): only a file-descriptor redirect keeps them off the console.
    For the command line only (``main()`` without argv); a library caller keeps its stderr.
    """
    old = sys.stderr
    old.flush()
    terminal = os.fdopen(os.dup(2), "w", buffering=1, encoding=getattr(old, "encoding", None) or "utf-8",
                         errors="backslashreplace")
    fd = os.open(os.fspath(log_file), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stderr = terminal
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) and h.stream is old:
            h.setStream(terminal)


def set_console_level(level: int) -> None:
    """The console handler's level (the demo prints its own stage lines over WARNING records)."""
    global _console_level
    _console_level = level
    for h in logging.getLogger().handlers:
        if getattr(h, "_mammo_ray", False) and not isinstance(h, logging.FileHandler):
            h.setLevel(level)


class LogWriter:
    """A file-like object whose lines become log records (Tune's console output, into the log file)."""

    def __init__(self, name: str, level: int = logging.INFO) -> None:
        self.logger, self.level, self._buf = logging.getLogger(name), level, ""

    def write(self, text: str) -> int:
        self._buf += text
        *lines, self._buf = self._buf.split("\n")
        for line in lines:
            if line.strip():
                self.logger.log(self.level, "%s", line.rstrip())
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


class _RayFloor(logging.Filter):
    """A Ray console handler's floor by the record's own logger. A record goes to the handlers
    of every ancestor, so a handler's level alone let ``ray.tune``'s warnings ("Experiment state
    snapshotting...", floor ERROR) through ``ray``'s console handler (floor WARNING)."""

    def __init__(self, quiet: bool) -> None:
        super().__init__()
        self.quiet = quiet

    def filter(self, record: logging.LogRecord) -> bool:
        owners = [n for n in RAY_LOGGERS if record.name == n or record.name.startswith(n + ".")]
        floor = RAY_LOGGERS[max(owners, key=len)] if owners else logging.NOTSET
        return record.levelno >= (logging.ERROR if self.quiet else floor)


def quiet_ray(file_handler: logging.Handler | None = None, *, quiet: bool | None = None) -> None:
    """Ray's console handlers at warnings (errors with ``quiet``; None: as setup_logging was
    told); its records also to our file. Ray configures ``ray.data``'s handlers when ``ray.data``
    is imported, so the archive jobs call this again after that import."""
    quiet = _quiet if quiet is None else quiet
    if file_handler is None:
        file_handler = next((h for h in logging.getLogger().handlers
                             if getattr(h, "_mammo_ray", False) and isinstance(h, logging.FileHandler)), None)
    if file_handler is None:  # a library caller, not the CLI: Ray's logging is left as Ray set it
        return
    for name in RAY_LOGGERS:
        lg = logging.getLogger(name)
        for h in lg.handlers:
            if not isinstance(h, logging.FileHandler) and not getattr(h, "_mammo_ray", False):
                # the floor of each record's own logger, not a handler level: see _RayFloor
                for f in [f for f in h.filters if isinstance(f, _RayFloor)]:
                    h.removeFilter(f)
                h.addFilter(_RayFloor(quiet))
        if not lg.propagate and file_handler not in lg.handlers:
            lg.addHandler(file_handler)  # a logger that does not propagate reaches the root's file only this way
        lg.setLevel(logging.INFO)  # Ray's INFO (operator progress, trial events) reaches the file


#: lines Ray's workers print that say nothing a user can act on (to the log file instead):
#: the C++ core's warning for every actor whose constructor arguments live in the object store
#: (ray-project/ray#53727: Ray Train's PreemptionWatcher, Ray Data's actor pools); Ray Data's
#: notice that its bars are off and its per-epoch "execution finished" lines from the split
#: coordinators that feed Ray Train's workers; the raylet's note that fractional-CPU actors
#: started more worker processes than it expected
WORKER_NOISE = re.compile("|".join((
    r"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object store",
    r"Progress bars disabled\. To enable",
    r"Dataset \S+ execution finished in [0-9.]+ seconds",
    r"PYTHON worker processes have been started on node",
)))


#: actors whose whole output goes to the log file: Ray Train's placement-group cleaner, a
#: best-effort monitor that prints a traceback when it cannot tell which of two Ray instances on
#: one machine to ask (the test suite's and a demo's), though training is not affected
QUIET_ACTORS = frozenset({"PlacementGroupCleaner"})


class _WorkerLines:
    """Ray's printer of worker output on the driver, less :data:`WORKER_NOISE` (to the log file)."""

    def __init__(self, printer: Any) -> None:
        self.printer = printer

    def __call__(self, data: dict) -> None:
        lines = data.get("lines") or []
        # the cleaner's own output, and any batch about it (its controller's "Failed to stop
        # PlacementGroupCleaner gracefully" and that traceback), go to the log file whole
        quiet_actor = data.get("actor_name") in QUIET_ACTORS or any("PlacementGroupCleaner" in x for x in lines)
        kept = [] if quiet_actor else [line for line in lines if not WORKER_NOISE.search(line)]
        for line in lines:
            if line not in kept:
                logging.getLogger("mammo_ray.ray_workers").debug("%s", line)
        if kept or (not lines and not quiet_actor):
            self.printer({**data, "lines": kept})


def filter_worker_lines() -> None:
    """Drop :data:`WORKER_NOISE` from the worker output Ray prints on the driver's console.

    Ray offers no option for this: its printer is a handler named ``ray_print_logs`` on a
    dispatcher of its private ``ray_logging`` module, wrapped here (a no-op when that changes).
    """
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    with dispatcher._lock:
        dispatcher.handlers = [(name, _WorkerLines(h) if name == "ray_print_logs" and not isinstance(h, _WorkerLines)
                                else h) for name, h in dispatcher.handlers]


#: off a terminal, long loops (a training epoch) log a progress line at most this often
PROGRESS_EVERY_S = 15.0


def rounded(value: Any, digits: int = 3) -> Any:
    """A figure as the console shows it: floats to ``digits`` decimals (0.5822222222222222 ->
    0.582), anything else (None, ints, text) as it is. Files keep the full precision."""
    if isinstance(value, float) and math.isfinite(value):
        return round(value, digits)
    return value


class Progress:
    """``<what>: done/total (p%), errors, images/s, ETA`` for one job.

    On a terminal the line is rewritten in place; otherwise it is logged every ``interval``
    seconds and once at the end, so a log or CI output gets a handful of lines, not one per batch.
    """

    def __init__(self, what: str, total: int, *, interval: float = 10.0, stream: TextIO | None = None,
                 unit: str = "images") -> None:
        self.what, self.total, self.interval, self.unit = what, int(total), float(interval), unit
        self.note = ""  # appended after "; " (the sweep's best val AUC so far)
        self._stream = stream  # None: sys.stderr when writing (Tune pickles its callbacks: no stream kept)
        self.done = self.errors = 0
        self.t0 = self.last = time.monotonic()
        self.logged = -1  # the done count of the last logged line

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        rate = self.done / elapsed
        left = self.total - self.done
        eta = time.strftime("%H:%M:%S", time.gmtime(left / rate)) if rate > 0 and left > 0 else "-"
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return (f"{self.what}: {self.done}/{self.total} ({pct:.0f}%), {self.errors} errors, "
                f"{rate:.1f} {self.unit}/s, ETA {eta}" + (f"; {self.note}" if self.note else ""))

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stderr

    @property
    def tty(self) -> bool:
        return bool(getattr(self.stream, "isatty", lambda: False)())

    def update(self, done: int, errors: int = 0) -> None:
        self.done += int(done)
        self.errors += int(errors)
        now = time.monotonic()
        if self.tty:
            self.stream.write("\r" + self.line())
            self.stream.flush()
        elif now - self.last >= self.interval:
            logger.info("%s", self.line())
            self.last, self.logged = now, self.done

    def close(self) -> None:
        if self.tty:
            self.stream.write("\r" + self.line() + "\n")
            self.stream.flush()
        elif self.logged != self.done:
            logger.info("%s", self.line())
