"""Sessions: tests, lint, typecheck, docs, bench, reliability."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.default_venv_backend = "venv"


@nox.session
def tests(session: nox.Session) -> None:
    """The default suite (a few minutes on 2 cores)."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", "-q", *session.posargs)


@nox.session
def reliability(session: nox.Session) -> None:
    """Slow fault-injection trials (20 SIGKILL runs) marked `slow`."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", "-q", "-m", "slow", "tests/reliability", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.17")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install("-e", ".[dev]")
    session.run("mypy", "artifex_ckpt")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation site strictly (broken links and references fail)."""
    session.install("-e", ".[docs]")
    session.run("mkdocs", "build", "--strict")


@nox.session
def bench(session: nox.Session) -> None:
    """The benchmark suite; pass `-- --quick` for the 2-minute version."""
    session.install("-e", ".")
    session.run("python", "-m", "benchmarks", *session.posargs)
