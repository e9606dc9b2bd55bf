"""The console: one progress line per job (in place on a terminal, every interval otherwise),
--quiet and --log-level on every subcommand, and Ray's records in the log file, not the terminal."""
from __future__ import annotations

import io
import logging

import pytest

from mammo_ray.cli import get_args_parser, main
from mammo_ray.console import Progress, quiet_ray, setup_logging


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_rewrites_one_line_on_a_terminal():
    out = _Tty()
    p = Progress("score", 10, stream=out)
    p.update(4, 1)
    p.update(6)
    p.close()
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")  # one line, rewritten with \r
    last = text.rstrip("\n").split("\r")[-1]
    assert last.startswith("score: 10/10 (100%), 1 errors,") and "images/s, ETA -" in last


def test_progress_logs_every_interval_and_once_at_the_end(caplog):
    caplog.set_level(logging.INFO, logger="mammo_ray.progress")
    p = Progress("explain", 100, interval=3600, stream=io.StringIO())
    for _ in range(10):
        p.update(10)
    p.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "mammo_ray.progress"]
    assert lines == [lines[-1]] and lines[0].startswith("explain: 100/100 (100%), 0 errors")
    caplog.clear()
    p = Progress("explain", 100, interval=0.0, stream=io.StringIO())
    p.update(50)
    p.update(50)
    p.close()  # the last update already logged 100/100: no repeat
    lines = [r.getMessage() for r in caplog.records if r.name == "mammo_ray.progress"]
    assert len(lines) == 2 and "50/100" in lines[0] and "ETA" in lines[0] and "100/100" in lines[1]


def test_every_subcommand_takes_quiet_and_log_level_before_or_after_its_name():
    parser = get_args_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) >= {"preprocess", "train", "tune", "evaluate", "explain", "score", "demo", "synth", "lr-find"}
    for name, p in sub.choices.items():
        flags = set(p._option_string_actions)
        assert {"--quiet", "-q", "--log-level", "--log-dir", "--verbose", "--debug"} <= flags, name
    a = parser.parse_args(["--quiet", "synth", "--out", "x", "--n", "4"])
    b = parser.parse_args(["synth", "--out", "x", "--n", "4", "--quiet", "--log-level", "warning"])
    assert a.quiet and b.quiet and b.log_level == "WARNING" and a.log_level is False


def test_bad_log_level_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit) as done:
        main(["synth", "--out", "x", "--log-level", "loud"])
    err = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 2 and len(err) == 1 and "'LOUD'" in err[0] and "'DEBUG'" in err[0]


def test_quiet_prints_results_only_and_the_log_file_keeps_the_rest(tmp_path, capsys):
    out = tmp_path / "ph"
    assert main(["synth", "--out", str(out), "--n", "4", "--log-dir", str(tmp_path / "logs")]) == 0
    loud = capsys.readouterr()
    assert loud.err.strip().splitlines()[-1].startswith("full log: ")
    assert main(["synth", "--out", str(tmp_path / "ph2"), "--n", "4", "--quiet", "--log-dir", str(tmp_path / "logs")]) == 0
    quiet = capsys.readouterr()
    assert "full log" not in quiet.err and " INFO " not in quiet.err
    logs = sorted((tmp_path / "logs").glob("synth-*.log"))
    assert len(logs) == 2 and all(p.stat().st_size > 0 for p in logs)


def test_ray_consoles_are_raised_and_copied_to_the_file(tmp_path):
    """Ray Data's console shows errors only (its "Progress bars disabled" and backpressure
    warnings are in the file), the other Ray loggers warnings; every record reaches the file."""
    ray_data = logging.getLogger("ray.data")
    console = logging.StreamHandler(io.StringIO())
    console.setLevel(logging.INFO)
    ray_data.addHandler(console)
    ray_data.propagate = False  # as Ray Data configures it
    try:
        path = setup_logging("t", log_dir=tmp_path, stream=io.StringIO())
        quiet_ray()
        ray_data.info("Running Dataset: logging_progress block")
        ray_data.warning("a real warning")
        ray_data.error("a real error")
        assert console.stream.getvalue() == "a real error\n"
        for h in logging.getLogger().handlers:
            h.flush()
        text = path.read_text()
        assert "logging_progress block" in text and "a real warning" in text and "a real error" in text
    finally:
        ray_data.removeHandler(console)


def test_tune_warnings_do_not_reach_the_console_through_rays_handler(tmp_path):
    """A record propagates to every ancestor's handlers: Tune's "Experiment state snapshotting"
    warning (a ``ray.tune`` logger, floor ERROR) must not print through ``ray``'s console
    handler (floor WARNING), which still prints Ray's own warnings."""
    ray_root = logging.getLogger("ray")
    console = logging.StreamHandler(io.StringIO())
    ray_root.addHandler(console)
    try:
        path = setup_logging("t", log_dir=tmp_path, stream=io.StringIO())
        quiet_ray()
        logging.getLogger("ray.tune.execution.experiment_state").warning("Experiment state snapshotting ...")
        logging.getLogger("ray._private.worker").warning("a Ray warning")
        logging.getLogger("ray.tune.tuner").error("a Tune error")
        assert console.stream.getvalue() == "a Ray warning\na Tune error\n"
        for h in logging.getLogger().handlers:
            h.flush()
        assert "Experiment state snapshotting" in path.read_text()
        setup_logging("t", log_dir=tmp_path, stream=io.StringIO(), quiet=True)
        quiet_ray()  # again, quiet: one filter on the handler, errors only
        logging.getLogger("ray._private.worker").warning("a second Ray warning")
        assert "second" not in console.stream.getvalue() and len(console.filters) == 1
    finally:
        ray_root.removeHandler(console)


def test_setup_logging_refuses_an_unknown_level(tmp_path):
    with pytest.raises(ValueError, match="--log-level 'loud': use one of DEBUG, INFO, WARNING, ERROR"):
        setup_logging("t", level="loud", log_dir=tmp_path)


def test_native_stderr_goes_to_the_log_file_and_python_stderr_stays_on_the_console(tmp_path):
    """What Ray's C++ core writes to file descriptor 2 (past Python's logging) lands in the log
    file; the console handler, progress lines and errors still reach the terminal."""
    import subprocess
    import sys

    code = ("import logging, os, sys\n"
            "from mammo_ray.console import route_native_stderr, setup_logging\n"
            f"path = setup_logging('score', log_dir={str(tmp_path)!r})\n"
            "route_native_stderr(path)\n"
            "os.write(2, b'core_worker.cc:2465: native line\\n')\n"
            "logging.getLogger('mammo_ray.x').info('a console record')\n"
            "print('mammo-ray score: error: a python line', file=sys.stderr)\n"
            "print(path)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    log = open(r.stdout.strip()).read()
    assert "core_worker.cc:2465: native line" in log and "core_worker" not in r.stderr
    assert "a console record" in r.stderr and "a console record" in log
    assert r.stderr.strip().endswith("mammo-ray score: error: a python line")
