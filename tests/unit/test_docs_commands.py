"""Every command the README and docs show is registered in tests/docs_commands.py and exercised: run here at toy
size, run by a named existing test, or external for a stated reason. A broken documented command fails here."""

from __future__ import annotations

import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from clipdr import cli
from clipdr.config import ConfigError, load_config
from tests import docs_commands as dc
from tests.docs_commands import REPO, CoveredBy, DocCommand, External, Run

COMMANDS = dc.collect()
BY_SHAPE = dc.by_shape(COMMANDS)
# clipdr and jobs/ commands, but for documented failures (a refused key is what they show).
PROJECT_COMMANDS = [c for c in COMMANDS if dc.stage_of(c.inner) and getattr(dc.entry_for(c), "returncode", 0) == 0]
STAGE_SECTIONS = {stage.name: stage.sections for stage in cli.STAGES}


# --------------------------------------------------------------------------- the parser


def test_commands_are_read_as_a_shell_reads_them(tmp_path):
    (tmp_path / "README.md").write_text(
        "```bash\n"
        "# a comment\n"
        ".venv/bin/clipdr train --config jobs/configs/demo.toml \\\n"
        "  --set train.mode=clip --set=train.run_name=x   # trailing comment\n"
        "cat > f.toml <<'EOF'\n"
        "clipdr not-a-command\n"
        "EOF\n"
        "A=1 python jobs/benchmark.py latency --batch-sizes 1 8 | tee out; kubectl get pods\n"
        "```\n"
        "```console\n"
        "$ clipdr promote --set lifecycle.model=m [--set lifecycle.version=3]\n"
        "shown output\n"
        "```\n"
        "```\n"
        "clipdr models\n"
        "```\n"
    )
    commands = dc.collect(tmp_path)
    assert [(c.line, c.shape) for c in commands] == [
        (3, "clipdr train --config jobs/configs/demo.toml --set train.mode --set train.run_name"),
        (5, "cat > f.toml << EOF"),
        (8, "python jobs/benchmark.py latency --batch-sizes"),
        (8, "tee out"),
        (8, "kubectl get pods"),
        (11, "clipdr promote --set lifecycle.model --set lifecycle.version"),
    ]
    assert commands[-1].output == ("shown output",)
    assert dc.config_args(commands[-1].argv) == (None, ["lifecycle.model=m", "lifecycle.version=3"])
    assert dc.unlabelled_commands(tmp_path) == ["README.md:15: clipdr models"]


# --------------------------------------------------------------------------- docs <-> registry


def test_every_documented_command_is_registered():
    missing = [f"{c.where}: {c.shape!r}" for c in COMMANDS if dc.entry_for(c) is None]
    assert not missing, (
        "documented commands without an entry in tests/docs_commands.py REGISTRY (add one: Run, CoveredBy or "
        "External with a reason):\n" + "\n".join(missing)
    )


def test_every_registry_entry_is_still_documented():
    stale = sorted(set(dc.REGISTRY) - set(BY_SHAPE))
    programs = {c.program for c in COMMANDS}
    stale += sorted(f"program {p}" for p in dc.EXTERNAL_PROGRAMS if p not in programs)
    assert not stale, "registry entries no documented command has (remove them):\n" + "\n".join(stale)


def test_no_unlabelled_block_holds_a_command():
    found = dc.unlabelled_commands()
    assert not found, "label these blocks ```bash or ```console so their commands are checked:\n" + "\n".join(found)


def test_documented_repository_paths_exist():
    missing = [f"{c.where}: {p}" for c in COMMANDS for p in dc.repo_paths(c.argv) if not (REPO / p).exists()]
    assert not missing, "documented commands name files that do not exist:\n" + "\n".join(missing)


def test_documented_make_targets_exist():
    targets = set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.MULTILINE))
    missing = [f"{c.where}: make {c.argv[1]}" for c in COMMANDS if c.program == "make" and c.argv[1] not in targets]
    assert not missing, "documented make targets the Makefile lacks:\n" + "\n".join(missing)


@pytest.mark.parametrize("command", PROJECT_COMMANDS, ids=lambda c: c.where)
def test_documented_arguments_parse_and_load_for_their_stage(command, capsys):
    """Every clipdr / jobs command, however it is exercised: the stage's own parser accepts its options, its
    --config loads, its --set keys exist, type-check and belong to the sections the stage reads (a key of another
    section would be silently ignored)."""
    stage = dc.stage_of(command.inner)
    assert stage in STAGE_SECTIONS, f"{command.where}: clipdr has no stage {stage!r}"
    args = command.inner[2:]  # after `clipdr <stage>`, or after `python jobs/<stage>.py`
    try:
        cli.build_parser().parse_args([stage, *args])
    except SystemExit as e:  # 0 for a documented --help
        assert e.code == 0, (
            f"{command.where}: clipdr {stage} refuses its documented arguments: {capsys.readouterr().err}"
        )
    config, overrides = dc.config_args(args)
    # A <placeholder> config is the reader's own file: the overrides are still checked, over the defaults.
    path = None if config is None or "<" in config else REPO / config
    try:
        load_config(path, overrides)
    except ConfigError as e:
        pytest.fail(f"{command.where}: {e}")
    sections = STAGE_SECTIONS[stage]
    foreign = [o for o in overrides if o.split(".")[0] not in sections]
    assert not foreign, f"{command.where}: clipdr {stage} does not read {foreign} (it reads {sections})"


def test_covering_tests_exist_and_invoke_the_command():
    problems = []
    for shape, entry in dc.REGISTRY.items():
        if not isinstance(entry, CoveredBy) or shape not in BY_SHAPE:
            continue
        command = BY_SHAPE[shape][0]
        found: set[str] = set()
        for spec in entry.tests:
            names = dc.strings_in_test(spec)
            if names is None:
                problems.append(f"{command.where}: covering test {spec} does not exist")
                break
            found |= names
        else:
            problems += [
                f"{command.where}: {', '.join(entry.tests)} name none of {group}"
                for group in dc.expected_invocations(command)
                if not dc.names_any(found, group)
            ]
    assert not problems, "\n".join(problems)


def test_jobs_scripts_run_the_stage_of_their_name():
    """Covered-by checks accept a test that runs jobs/<stage>.py for `clipdr <stage>`: that holds only if it does."""
    for script in sorted((REPO / "jobs").glob("*.py")):
        if script.stem != "benchmark":
            assert dc.job_stage(f"jobs/{script.name}") == script.stem, script


def test_external_entries_say_why():
    reasons = [e.reason for e in dc.REGISTRY.values() if isinstance(e, External)] + list(dc.EXTERNAL_PROGRAMS.values())
    assert all(len(reason) > 10 for reason in reasons)


# --------------------------------------------------------------------------- running them


def check_run(
    command: DocCommand,
    entry: Run,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Runs a documented clipdr or ``python jobs/*.py`` command in this process, with ``entry.toy`` appended, and
    checks its exit status and, for a console block, the output the docs show.

    In-process saves the 6-10 s import of torch, open_clip and ray per command; the console scripts themselves
    run as subprocesses in `test_console_scripts_run_as_documented`.
    """
    argv = [*command.argv, *(word.format(tmp=tmp_path) for word in entry.toy)]
    monkeypatch.chdir(REPO)  # documented paths are relative to the repository root
    try:
        if command.program == "clipdr":
            returncode = cli.main(argv[1:])
        else:
            assert command.program == "python" and argv[1].startswith("jobs/"), command.where
            monkeypatch.setattr(sys, "argv", argv[1:])
            runpy.run_path(str(REPO / argv[1]), run_name="__main__")
            returncode = 0
    except SystemExit as e:  # --help, and every jobs/ script, exits through sys.exit
        returncode = e.code if isinstance(e.code, int) else int(e.code is not None)
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert returncode == entry.returncode, f"{command.where}: `{' '.join(command.argv)}` exited {returncode}\n{output}"
    for shown in command.output:  # a console block's shown output ("..." elides the rest of a line)
        assert shown.removesuffix("...") in output, f"{command.where}: the docs show {shown!r}, it printed:\n{output}"


RUN_HERE = [s for s, e in dc.REGISTRY.items() if isinstance(e, Run) and s in BY_SHAPE]


@pytest.mark.parametrize("shape", RUN_HERE)
def test_documented_command_runs_at_toy_size(shape, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")  # nothing lands in the repository
    # One run per distinct documented argv: the same line in two docs runs once.
    for command in {c.argv: c for c in BY_SHAPE[shape]}.values():
        check_run(command, dc.REGISTRY[shape], tmp_path, capsys, monkeypatch)


def test_console_scripts_run_as_documented():
    """The installed ``clipdr`` script and each documented jobs/ script, as real processes (cheap: no torch)."""
    clipdr = Path(sys.executable).with_name("clipdr")
    console = next(c for c in COMMANDS if c.output and c.program == "clipdr")
    result = subprocess.run([str(clipdr), *console.argv[1:]], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == dc.REGISTRY[console.shape].returncode, result.stderr
    assert console.output[0].removesuffix("...") in result.stderr
    scripts = sorted({c.inner[1] for c in PROJECT_COMMANDS if dc.program_of(c.inner) == "python"})
    for script in scripts:
        result = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, cwd=REPO)
        assert result.returncode == 0 and "--config" in result.stdout, (script, result.stderr)
