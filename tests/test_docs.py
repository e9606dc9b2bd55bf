"""The user documentation: README.md is a short guide that keeps its reader inside the
repository, docs/cli.md is the parsers' reference as they are now, and the figures the
README used to hold live in docs/."""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest

from tests.conftest import REPO

README = REPO / "README.md"
DOCS = REPO / "docs"
REGENERATE = "python -m mammo_ray.cli.reference > docs/cli.md"
#: the only sites README may link to: public pages of the project's own dependencies and the paper
PUBLIC_PAGES = {"docs.ray.io", "doi.org"}
#: [text](target) and ![alt](target); the target ends at the first space or ')'
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)[^)]*\)")
#: an absolute file path: '/' opening a path, not inside a URL, a relative path or '~/...'
ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~$}>)\]*\-])/[A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]*)*")
#: history a guide does not carry: real-data runs by number, dated measurements, requests quoted
HISTORY = re.compile(r"\bruns? [1-9]\b|\b20\d\d-\d\d-\d\d\b|the issue asks", re.IGNORECASE)


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    lines, inside_code = [], False
    for line in path.read_text().splitlines():
        inside_code ^= line.startswith("```")
        if not inside_code and line.startswith("#"):
            lines.append(line.lstrip("#"))
    return {_slug(h) for h in lines}


def _link_problems(path: Path, root: Path = REPO) -> list[str]:
    """Every way ``path`` (a Markdown file under ``root``) sends its reader outside ``root``."""
    text = path.read_text()
    problems = [f"'../' in {path.name}: {m.group(0)!r}" for m in re.finditer(r"\S*\.\./\S*", text)]
    problems += [f"absolute path in {path.name}: {m.group(0)!r}" for m in ABSOLUTE_PATH.finditer(text)]
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://")):
            continue  # checked per file: README allows only PUBLIC_PAGES
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if root.resolve() not in resolved.parents or not resolved.exists():
            problems.append(f"{path.name}: link {target!r} does not resolve inside the repository")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            problems.append(f"{path.name}: link {target!r}: no heading '#{anchor}' in {resolved.name}")
    return problems


def test_cli_reference_is_current():
    """docs/cli.md is what the parsers generate now (a fresh process: tests register backbones
    of their own, which would show in --backbone's choices)."""
    r = subprocess.run([sys.executable, "-m", "mammo_ray.cli.reference"], capture_output=True, text=True,
                       timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (DOCS / "cli.md").read_text() == r.stdout, f"docs/cli.md is stale: run `{REGENERATE}`"


def test_cli_reference_covers_every_subcommand_and_option():
    """Generated from the parsers, the reference names every subcommand, every option each one
    takes (its own or the console options) and every choice an option offers."""
    from mammo_ray.cli import get_args_parser
    from mammo_ray.cli.reference import render_reference

    parser = get_args_parser()
    text = render_reference(parser)
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(subs) >= {"preprocess", "train", "lr-find", "tune", "evaluate", "score", "explain", "demo"}
    for name, sub in subs.items():
        section = text.split(f"\n## mammo-ray {name}\n", 1)[1].split("\n## ", 1)[0]
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction) or action.help is argparse.SUPPRESS:
                continue
            for option in action.option_strings:
                assert f"`{option}`" in section or f"`{option}`" in text.split("\n## mammo-ray ", 1)[0], (name, option)
            if not action.option_strings:
                assert f"`{action.dest}`" in section, (name, action.dest)
            for choice in action.choices or ():
                assert str(choice) in section, (name, action.dest, choice)


def test_cli_reference_shows_defaults_and_help():
    """A flag's own default and its help text reach the table (a parser built here, so the
    figures are known)."""
    from mammo_ray.cli.reference import render_reference

    top = argparse.ArgumentParser(prog="tool")
    sub = top.add_subparsers(dest="command")
    p = sub.add_parser("run", help="run it")
    p.add_argument("--steps", type=int, default=100, help="how many steps")
    p.add_argument("--mode", choices=("a", "b"), default="b", help="which mode")
    p.add_argument("--fast", action="store_true", help="go fast")
    p.add_argument("--hidden", help=argparse.SUPPRESS)
    text = render_reference(top)
    assert "| `--steps` | how many steps | 100 |" in text
    assert "| `--mode` | which mode (choices: a, b) | b |" in text
    assert "| `--fast` | go fast | off |" in text
    assert "--hidden" not in text
    assert "## tool run\n\nRun it.\n" in text and "[`run`](#tool-run)" in text


def test_readme_is_a_short_guide_that_stays_in_the_repository():
    text = README.read_text()
    lines = text.splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; the guide keeps to 300, details go to docs/"
    assert _link_problems(README) == []
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://")):
            assert urlparse(target).hostname in PUBLIC_PAGES, target
        elif not target.startswith("#"):
            assert target.startswith("docs/"), f"README links into docs/ only: {target}"
    history = [m.group(0) for m in HISTORY.finditer(text)]
    assert history == [], f"history belongs in docs/results.md or docs/benchmarks.md: {history}"


def test_readme_reaches_an_explained_model_within_100_lines():
    """A newcomer's path: own data preprocessed, trained, evaluated and explained in the first
    100 lines, with the test command exactly as CI and the Makefile run it."""
    head = "\n".join(README.read_text().splitlines()[:100])
    for step in ("mammo-ray preprocess", "mammo-ray train", "mammo-ray evaluate", "mammo-ray explain"):
        assert step in head, step
    assert "make test" in head and "make demo" in head
    assert "make test" in (REPO / ".ci" / "run").read_text()
    assert re.search(r"^test: ", (REPO / "Makefile").read_text(), re.MULTILINE)


@pytest.mark.parametrize("name", ["architecture.md", "results.md", "benchmarks.md", "cli.md"])
def test_docs_stay_in_the_repository(name):
    assert (DOCS / name).exists(), name
    assert _link_problems(DOCS / name) == []


def test_link_check_catches_what_leaves_the_repository(tmp_path):
    """The check itself: each way out of the repository is reported, a good link is not."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "cli.md").write_text("# CLI\n## mammo-ray train\n")
    page = tmp_path / "docs" / "probe.md"
    page.write_text("# Probe\n[a](../../shared/docs/DESIGN.md) [b](missing.md) [c](cli.md#no-such-heading)\n"
                    "run `mammo-ray preprocess /data/x --out y`\n[d](#probe) [e](cli.md#mammo-ray-train)\n")
    problems = _link_problems(page, root=tmp_path)
    assert len([p for p in problems if "'../'" in p]) == 1
    assert any("'/data/x'" in p for p in problems)
    assert any("missing.md" in p for p in problems)
    assert any("no-such-heading" in p for p in problems)
    assert len(problems) == 5, problems  # [a] twice (its ../ and where it leads); [d] and [e] resolve


def test_results_hold_every_real_data_run():
    """docs/results.md holds the real-data runs as one table (a row per run) and the
    conclusions; docs/benchmarks.md says how to run every benchmark script."""
    results = (DOCS / "results.md").read_text()
    rows = re.findall(r"^\| \*?\*?(\d)\*?\*? \|", results, re.MULTILINE)
    assert sorted(set(rows)) == [str(i) for i in range(1, 10)], rows
    assert "0.694 [0.612, 0.771]" in results  # the best val-chosen test AUC, as measured
    benchmarks = (DOCS / "benchmarks.md").read_text()
    for script in sorted((REPO / "benchmarks").glob("*.py")):
        if script.name != "gpu.py":  # run through gpu.sh
            assert f"benchmarks/{script.name}" in benchmarks, script.name
    assert "benchmarks/gpu.sh" in benchmarks
