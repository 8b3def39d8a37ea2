"""A newcomer's first commands: global options anywhere, and ``orchestrator init``."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import git, make_repo
from harness import AGENTS, handoff_doc, wait_for, write_config

from orchestrator.cli import build_parser


def run_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, **(env or {})}
    environment.pop("ORCHESTRATOR_CONFIG", None)
    environment.pop("ORCHESTRATOR_SOCKET", None)
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )


# --- global options before or after the subcommand ------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["--config", "C", "--socket", "S", "--log-level", "debug", "--log-format", "json",
         "status"],
        ["status", "--config", "C", "--socket", "S", "--log-level", "debug", "--log-format",
         "json"],
        ["--config", "C", "--log-format", "json", "status", "--socket", "S", "--log-level",
         "debug"],
    ],
)
def test_global_options_before_or_after_the_command(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    got = (args.config, args.socket, args.log_level, args.log_format)
    assert got == ("C", "S", "debug", "json")


def test_an_option_only_before_the_command_is_not_reset_by_the_subcommand() -> None:
    args = build_parser().parse_args(["--config", "C", "check-config"])
    assert args.config == "C"
    assert args.log_level == "info"
    args = build_parser().parse_args(["check-config"])
    assert args.config is None


def test_the_agent_command_keeps_its_own_options() -> None:
    args = build_parser().parse_args(["worker", "--socket", "S", "--", "agent", "--config", "x"])
    assert args.socket == "S"
    assert args.config is None
    assert args.agent == ["--", "agent", "--config", "x"]


def test_check_config_with_config_after_the_command(tmp_path: Path, repo: Path) -> None:
    # The line the sample config's own header tells people to run.
    config = write_config(tmp_path, repo)
    header = (Path(__file__).parents[1] / "config" / "orchestrator.toml").read_text()
    assert "orchestrator check-config --config PATH" in header
    result = run_cli("check-config", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "configuration is valid" in result.stdout
    before = run_cli("--config", str(config), "check-config", cwd=tmp_path)
    assert before.returncode == 0, before.stderr
    assert before.stdout == result.stdout


def test_socket_after_the_command_is_the_one_used(tmp_path: Path) -> None:
    missing = tmp_path / "nobody-here.sock"
    result = run_cli("status", "--socket", str(missing), cwd=tmp_path)
    assert result.returncode == 3
    assert str(missing) in result.stderr


# --- orchestrator init ---------------------------------------------------------------


def test_init_in_a_python_project_writes_a_config_that_checks(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "proj")
    (repo / "tests").mkdir()
    (repo / "tests" / "test_app.py").write_text("def test_ok():\n    assert True\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "tests")
    (repo / "src").mkdir(exist_ok=True)

    # Run from a subfolder: init finds the repository's top.
    result = run_cli("init", cwd=repo / "src")
    assert result.returncode == 0, result.stderr
    config = repo / "orchestrator.toml"
    assert f"wrote {config}" in result.stdout
    text = config.read_text()
    data = tomllib.loads(text)
    assert data["repository"] == {"path": str(repo), "integration_branch": "main"}
    assert data["daemon"]["state_dir"] == ".orchestrator"
    assert data["gates"] == [
        {"name": "tests", "run": ["python3", "-m", "pytest", "-q"], "timeout_s": 900}
    ]
    assert "GUESSED" in text
    assert "orchestrator serve" in result.stdout
    assert "orchestrator worker" in result.stdout
    assert "orchestrator submit" in result.stdout

    check = run_cli("check-config", "--config", str(config), cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"state dir    {repo / '.orchestrator'}" in check.stdout
    # Found from the repository's top without --config, as README shows.
    assert run_cli("check-config", cwd=repo).returncode == 0
    # The state folder never makes the checkout look changed.
    (repo / ".orchestrator").mkdir()
    (repo / ".orchestrator" / "x").write_text("state")
    assert git(repo, "status", "--porcelain", "--untracked-files=all") == "?? orchestrator.toml"


def test_init_finds_the_checked_out_branch_and_a_make_target(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "proj")
    git(repo, "checkout", "-q", "-b", "develop")
    (repo / "Makefile").write_text("build:\n\ttrue\n\ntest: build\n\ttrue\n")
    (repo / "package.json").write_text('{"scripts": {"test": "jest"}}')
    result = run_cli("init", cwd=repo)
    assert result.returncode == 0, result.stderr
    data = tomllib.loads((repo / "orchestrator.toml").read_text())
    assert data["repository"]["integration_branch"] == "develop"
    assert data["gates"][0]["run"] == ["make", "test"]
    assert "Makefile has a test target" in result.stdout
    check = run_cli("check-config", cwd=repo)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "(branch develop)" in check.stdout


@pytest.mark.parametrize(
    ("files", "run"),
    [
        ({"package.json": '{"scripts": {"test": "node t.js"}}'}, ["npm", "test"]),
        ({"Cargo.toml": '[package]\nname = "x"\n'}, ["cargo", "test"]),
        ({"go.mod": "module x\n"}, ["go", "test", "./..."]),
        ({"pyproject.toml": "[tool.pytest.ini_options]\n"}, ["python3", "-m", "pytest", "-q"]),
    ],
)
def test_init_guesses_the_gate_of_each_ecosystem(
    tmp_path: Path, files: dict[str, str], run: list[str]
) -> None:
    repo = make_repo(tmp_path / "proj")
    for name, content in files.items():
        (repo / name).write_text(content)
    assert run_cli("init", cwd=repo).returncode == 0
    assert tomllib.loads((repo / "orchestrator.toml").read_text())["gates"][0]["run"] == run


def test_init_without_a_test_command_writes_no_gate_and_says_so(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "proj")
    result = run_cli("init", cwd=repo)
    assert result.returncode == 0, result.stderr
    assert "none found" in result.stdout
    assert "gates" not in tomllib.loads((repo / "orchestrator.toml").read_text())
    assert run_cli("check-config", cwd=repo).returncode == 0


def test_init_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "proj")
    (repo / "orchestrator.toml").write_text("# mine\n")
    refused = run_cli("init", cwd=repo)
    assert refused.returncode == 2
    assert "already exists" in refused.stderr and "--force" in refused.stderr
    assert (repo / "orchestrator.toml").read_text() == "# mine\n"
    forced = run_cli("init", "--force", cwd=repo)
    assert forced.returncode == 0, forced.stderr
    assert "[repository]" in (repo / "orchestrator.toml").read_text()
    # A second --force does not list the state folder twice.
    assert run_cli("init", "--force", cwd=repo).returncode == 0
    exclude = (repo / ".git" / "info" / "exclude").read_text()
    assert exclude.count("/.orchestrator/") == 1


def test_init_outside_a_repository_says_what_to_do(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    result = run_cli("init", cwd=plain, env={"GIT_CEILING_DIRECTORIES": str(tmp_path)})
    assert result.returncode == 2
    assert "not inside a git repository" in result.stderr
    assert not (plain / "orchestrator.toml").exists()


def test_init_in_a_repository_without_commits_says_what_to_do(tmp_path: Path) -> None:
    repo = tmp_path / "empty"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    result = run_cli("init", cwd=repo)
    assert result.returncode == 2
    assert "no commit yet" in result.stderr


def test_init_paths_with_quotes_and_backslashes_stay_valid_toml(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / 'we"ird\\name')
    assert run_cli("init", cwd=repo).returncode == 0, "init failed"
    data = tomllib.loads((repo / "orchestrator.toml").read_text())
    assert data["repository"]["path"] == str(repo)


def test_init_serve_worker_submit_lands_work(tmp_path: Path) -> None:
    # README's first hour, command for command, in a fresh repository of one's own.
    repo = make_repo(tmp_path / "p")
    (repo / "Makefile").write_text("test:\n\ttest -f README.md\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "make test")
    assert run_cli("init", cwd=repo).returncode == 0
    config = repo / "orchestrator.toml"
    # Only so that parallel test runs never fight over the page's port.
    config.write_text(config.read_text().replace("127.0.0.1:9464", "127.0.0.1:0"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_")}
    log = (tmp_path / "serve.log").open("wb")
    serve = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "serve"],
        cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    worker: subprocess.Popen[bytes] | None = None
    try:
        socket_path = repo / ".orchestrator" / "orchestrator.sock"
        wait_for(lambda: socket_path.exists() or serve.poll() is not None, "the daemon")
        assert serve.poll() is None, (tmp_path / "serve.log").read_text()
        worker = subprocess.Popen(
            [sys.executable, "-m", "orchestrator", "worker", "--wait", "1", "--max-handoffs",
             "1", "--", sys.executable, str(AGENTS / "good.py")],
            cwd=repo, env=env, stdout=(tmp_path / "worker.log").open("wb"),
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        (tmp_path / "my-handoff.md").write_text(handoff_doc("first-one"))
        submitted = run_cli("submit", str(tmp_path / "my-handoff.md"), cwd=repo)
        assert submitted.returncode == 0, submitted.stderr
        assert "submitted first-one" in submitted.stdout

        def merged() -> bool:
            status = run_cli("status", "--json", cwd=repo)
            return '"merged": 1' in status.stdout

        wait_for(merged, "first-one to merge")
        assert "done by the good agent" in git(repo, "show", "main:work/first-one.txt")
        assert worker.wait(timeout=60) == 0
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
            worker.wait()
        serve.terminate()
        try:
            serve.wait(timeout=60)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.wait()
        log.close()


def test_every_command_has_help_naming_the_global_options(
    capsys: pytest.CaptureFixture[str],
) -> None:
    parser = build_parser()
    commands = next(
        a for a in parser._actions if isinstance(a, argparse._SubParsersAction)
    ).choices
    assert {"init", "status", "check-config", "serve", "worker", "submit"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as exited:
            parser.parse_args([name, "--help"])
        assert exited.value.code == 0
        out = capsys.readouterr().out
        for option in ("--config", "--socket", "--log-format", "--log-level"):
            assert option in out, (name, option)
    with pytest.raises(SystemExit):
        parser.parse_args(["status", "--help"])
    assert "--watch" in capsys.readouterr().out
