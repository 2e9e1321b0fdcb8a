"""Every shell command the README and docs show, and how the suite exercises each one.

Commands are collected from fenced ``bash`` / ``sh`` / ``shell`` / ``console`` blocks of README.md, docs/**/*.md
and infra/README.md: ``\\`` continuations joined, comments and heredoc bodies dropped, ``;`` ``&&`` ``|`` split,
redirections kept as arguments (so that their files are checked too); in a ``console`` block only ``$ `` lines are
commands, the lines after one are its shown output. A command's *shape* is its program, stage or script and the
option keys it uses, values dropped but for ``--config``:
``clipdr reinforce --config jobs/configs/datacompdr12m.toml --set reinforce.dry_run``. `REGISTRY` maps every shape
to how it is exercised; tests/unit/test_docs_commands.py fails on a documented shape missing here, or an entry no
longer documented, naming the file and line.
"""

from __future__ import annotations

import ast
import re
import shlex
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC_GLOBS = ("README.md", "docs/**/*.md", "infra/README.md")
SHELL_LANGUAGES = ("bash", "sh", "shell", "console")
# First words that make a line in an unlabelled block a command someone could copy (it must then be labelled).
COMMAND_WORDS = ("clipdr", "python", "make", "ray", "mlflow", "terraform", "kubectl", "docker", "pytest")
# Top-level folders of the repository: a documented argument under one of them is a path that must exist.
REPO_DIRS = ("jobs", "docker", "infra", "tests", "docs", "platform", "scripts")

_FENCE = re.compile(r"^\s*```\s*([\w+-]*)")
_HEREDOC = re.compile(r"<<-?\s*['\"]?(\w+)['\"]?")
_PLACEHOLDER = re.compile(r"<[A-Za-z][\w .-]*>")  # <student>, <registered name>: the reader fills them in
_ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_OPERATORS = {";", "&", "&&", "|", "||"}


@dataclass(frozen=True)
class DocCommand:
    """One command as documented: where, its words (shell-split) and, in a console block, the output shown."""

    path: str
    line: int
    argv: tuple[str, ...]
    output: tuple[str, ...] = ()

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"

    @property
    def shape(self) -> str:
        return shape_of(self.argv)

    @property
    def program(self) -> str:
        return program_of(self.argv)

    @property
    def inner(self) -> tuple[str, ...]:
        """The project command itself: what ``ray job submit ... --`` runs, else the whole argv."""
        if self.program == "ray" and "--" in self.argv:
            return self.argv[self.argv.index("--") + 1 :]
        return self.argv


def program_of(argv: tuple[str, ...]) -> str:
    """``.venv/bin/clipdr`` and ``clipdr`` are one program; ``$(terraform ...)`` runs terraform."""
    return Path(argv[0].removeprefix("$(").split()[0]).name


def _optional_parts_included(argv: list[str]) -> tuple[str, ...]:
    """``[--set k=v]`` (an optional part, as usage lines write it) counts as ``--set k=v``."""
    words, inside = [], False
    for word in argv:
        if word.startswith("[-"):
            word, inside = word[1:], True
        if inside and word.endswith("]"):
            word, inside = word[:-1], False
        words.append(word)
    return tuple(words)


def shape_of(argv: tuple[str, ...]) -> str:
    """Program, sub-commands, stage or script, then option keys in order; option values dropped but --config's."""
    program = program_of(argv)
    rest = list(argv[1:])
    if program == "ray" and "--" in rest:
        cut = rest.index("--")
        return f"{shape_of((program, *rest[:cut]))} -- {shape_of(tuple(rest[cut + 1 :]))}"
    words = [program]
    if program == "python" and rest[:1] == ["-m"]:
        words += rest[:2]
        rest = rest[2:]
    positional = True  # words before the first option are sub-commands; after one, values
    i = 0
    while i < len(rest):
        word = rest[i]
        if word.startswith("-") and word != "-":
            positional = False
            name, eq, value = word.partition("=")
            if name in ("--set", "--config"):
                if not eq:
                    i += 1
                    value = rest[i] if i < len(rest) else ""
                words.append(f"--set {value.partition('=')[0]}" if name == "--set" else f"--config {value}")
            else:
                words.append(name)
        elif positional:
            words.append(word)
        i += 1
    return " ".join(words)


# --------------------------------------------------------------------------- collecting


def doc_files(root: Path = REPO) -> list[Path]:
    return sorted({p for pattern in DOC_GLOBS for p in root.glob(pattern)})


def fenced_blocks(text: str) -> Iterator[tuple[str, list[tuple[int, str]]]]:
    """``(language, [(line number, line), ...])`` for every fenced block of a markdown text."""
    language, lines = None, []
    for number, line in enumerate(text.splitlines(), 1):
        match = _FENCE.match(line)
        if match and language is None:
            language, lines = match.group(1).lower(), []
        elif line.strip().startswith("```") and language is not None:
            yield language, lines
            language = None
        elif language is not None:
            lines.append((number, line))


def _protect(text: str) -> tuple[str, dict[str, str]]:
    """Hides ``$(...)`` substitutions and ``<placeholder>``s from shlex, which would split them at ``|`` or ``<``."""
    hidden: dict[str, str] = {}

    def hide(part: str) -> str:
        token = f"\x00{len(hidden)}\x00"
        hidden[token] = part
        return token

    out, i = [], 0
    while i < len(text):
        if text.startswith("$(", i):
            depth, j, quoted = 0, i + 1, False
            while j < len(text):
                quoted ^= text[j] == "'"
                depth += 0 if quoted else (text[j] == "(") - (text[j] == ")")
                if depth == 0:
                    break
                j += 1
            out.append(hide(text[i : j + 1]))
            i = j + 1
        else:
            out.append(text[i])
            i += 1
    return _PLACEHOLDER.sub(lambda m: hide(m.group(0)), "".join(out)), hidden


def _split_commands(text: str) -> list[tuple[str, ...]]:
    """Shell-splits one logical line into its simple commands, without comments or environment prefixes."""
    text, hidden = _protect(text)
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|<>")
    lexer.whitespace_split = True
    commands: list[tuple[str, ...]] = []
    current: list[str] = []
    for word in lexer:
        if word in _OPERATORS:
            commands.append(_optional_parts_included(current))
            current = []
        elif not current and _ENV_ASSIGNMENT.match(word):
            continue  # VAR=value before a command sets its environment
        else:
            current.append(re.sub("\x00\\d+\x00", lambda m: hidden[m.group(0)], word))
    commands.append(_optional_parts_included(current))
    return [c for c in commands if c]


def commands_in_block(path: str, language: str, lines: list[tuple[int, str]]) -> list[DocCommand]:
    console = language == "console"
    found: list[DocCommand] = []
    i = 0
    while i < len(lines):
        number, line = lines[i]
        text = line.strip()
        i += 1
        if console:
            if not text.startswith("$ "):
                continue
            text = text[2:]
        if not text or text.startswith("#"):
            continue
        while text.endswith("\\") and i < len(lines):
            text = text[:-1] + " " + lines[i][1].strip()
            i += 1
        heredoc = _HEREDOC.search(text)
        if heredoc:  # the body is data, not commands
            while i < len(lines) and lines[i][1].strip() != heredoc.group(1):
                i += 1
            i += 1
        output: list[str] = []
        while console and i < len(lines) and not lines[i][1].strip().startswith("$ "):
            output.append(lines[i][1].rstrip())
            i += 1
        found += [DocCommand(path, number, argv, tuple(output)) for argv in _split_commands(text)]
    return found


def collect(root: Path = REPO) -> list[DocCommand]:
    """Every documented command, in file and line order."""
    commands = []
    for file in doc_files(root):
        for language, lines in fenced_blocks(file.read_text()):
            if language in SHELL_LANGUAGES:
                commands += commands_in_block(str(file.relative_to(root)), language, lines)
    return commands


def by_shape(commands: list[DocCommand]) -> dict[str, list[DocCommand]]:
    grouped: dict[str, list[DocCommand]] = defaultdict(list)
    for command in commands:
        grouped[command.shape].append(command)
    return grouped


def unlabelled_commands(root: Path = REPO) -> list[str]:
    """``file:line: text`` of lines in blocks without a shell language that look like commands to copy."""
    found = []
    for file in doc_files(root):
        for language, lines in fenced_blocks(file.read_text()):
            if language in SHELL_LANGUAGES:
                continue
            for number, line in lines:
                words = line.strip().removeprefix("$ ").split()
                if words and words[0].removeprefix(".venv/bin/") in COMMAND_WORDS:
                    found.append(f"{file.relative_to(root)}:{number}: {line.strip()}")
    return found


# --------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Run:
    """Executed by tests/unit/test_docs_commands.py: the documented argv, then ``toy`` (later --set and options
    win); ``{tmp}`` in ``toy`` is a fresh temporary folder."""

    toy: tuple[str, ...] = ()
    returncode: int = 0


@dataclass(frozen=True)
class CoveredBy:
    """Run by existing tests (``path::name``), too costly to repeat; they must exist and name the entrypoint
    (`expected_invocations`) in their code."""

    tests: tuple[str, ...]


@dataclass(frozen=True)
class External:
    """Cannot run here by nature; ``reason`` says why."""

    reason: str


Entry = Run | CoveredBy | External

_TOY_SYNTH = (
    "--set", "synth.output={tmp}/world", "--set", "synth.num_teacher=4", "--set", "synth.num_student=4",
    "--set", "synth.num_zeroshot=4", "--set", "synth.num_retrieval=4", "--set", "synth.image_size=16",
)  # fmt: skip
_TOY_CAPTIONER = (
    *("--flops-models", "clipdr-tiny-coca", "--time-models", "clipdr-tiny-coca", "--max-len", "4", "--rows", "2"),
    *("--rounds", "1", "--warmup", "0", "--output", "{tmp}/captioner.md"),
)
_TOY_LATENCY = ("--variants", "clipdr-tiny-mct", "--reference", "clipdr-tiny-mci", "--output", "{tmp}/latency.md")

_TOY_TRAIN_BENCH = (
    *("--student", "clipdr-tiny-vit", "--teachers", "clipdr-tiny-vit", "--batch-size", "4", "--steps", "1"),
    *("--warmup", "0", "--views", "1", "--captions", "1", "--image-size", "32", "--output", "{tmp}/train.md"),
    *("--io-views", "2", "--io-dim", "8", "--io-captions", "1"),
)

# The forgetting guard's smallest run: every recipe and the table, on the tiny ViT (not the numbers).
_TOY_FINETUNE = (
    *("--model", "clipdr-tiny-vit", "--pretrain-samples", "16", "--pretrain-steps", "2", "--finetune-samples", "8"),
    *("--finetune-steps", "2", "--batch-size", "8", "--eval-per-class", "1", "--templates", "1", "--alphas", "0.5"),
    *("--output", "{tmp}/finetune.md"),
)

# Runs docs/reinforce.md's growing dataset (base, captions, teacher, inspect, train) on the suite's Ray.
_GROW_TEST = "tests/integration/test_train.py::test_a_caption_set_added_on_ray_feeds_the_training_input"
_DEMO_TEST = "tests/integration/test_demo.py::test_demo_runs_every_stage_into_mlflow_and_caches"  # runs clipdr study
_SWEEP_TEST = "tests/integration/test_train.py::test_a_sweep_trains_one_nested_run_per_trial_and_summarises"

REGISTRY: dict[str, Entry] = {
    # README: the two commands.
    "make demo": External("creates .venv (pip, network) and runs the 8-minute demo; test_demo runs it at toy size"),
    "make test": External("creates .venv (pip, network) and runs this whole suite, which this test is part of"),
    "python3 -m --no-deps --only-binary --python-version --implementation --platform -d": External(
        "downloads wheels from PyPI (network), for a machine without it; jobs/gpu_check.sh installs them"
    ),
    "bash jobs/gpu_check.sh": External(
        "needs one CUDA device (it stops at once without one: tests/integration/test_gpu_check.py checks that); the "
        "same test runs every phase in the script's CPU smoke mode"
    ),
    # README: configuration and the synthetic world.
    "clipdr synth --config jobs/configs/demo.toml --set synth.num_teacher --set synth.output": Run(_TOY_SYNTH),
    "clipdr synth --help": Run(),
    "clipdr config --config jobs/configs/demo.toml": Run(),
    "clipdr synth --set synth.num_teachr": Run(returncode=2),  # README's console example of a refused key
    "clipdr synth --set synth.output --set synth.num_teacher --set synth.num_student": Run(_TOY_SYNTH),
    # Reinforce.
    "python jobs/reinforce.py --config jobs/configs/demo.toml": CoveredBy(
        ("tests/integration/test_job_submit.py::test_ray_job_submit_reinforce_round_trip",)
    ),
    "ray job submit --working-dir -- python jobs/reinforce.py --config jobs/configs/demo.toml": CoveredBy(
        ("tests/integration/test_job_submit.py::test_ray_job_submit_reinforce_round_trip",)
    ),
    "clipdr reinforce --config jobs/configs/datacompdr12m.toml --set reinforce.dry_run": Run(),
    # docs/reinforce.md: a caption set added to a complete dataset, on Ray, then trained on.
    "clipdr reinforce --config jobs/configs/demo.toml --set reinforce.add --set reinforce.caption_set": CoveredBy(
        ("tests/integration/test_train.py::test_a_caption_set_added_on_ray_feeds_the_training_input",)
    ),
    # docs/reinforce.md: the growing dataset on the demo world, every step; one test runs the whole flow at toy size.
    "clipdr synth --config jobs/configs/demo.toml": Run(_TOY_SYNTH),
    **{
        shape: CoveredBy((_GROW_TEST,))
        for shape in (
            "clipdr reinforce --config jobs/configs/demo.toml --set reinforce.output --set reinforce.num_syn_captions "
            "--set reinforce.teachers",
            "clipdr reinforce --config jobs/configs/demo.toml --set reinforce.output --set reinforce.add "
            "--set reinforce.caption_set --set reinforce.num_syn_captions --set reinforce.teachers",
            "clipdr reinforce --config jobs/configs/demo.toml --set reinforce.output --set reinforce.add",
            "clipdr inspect data/demo/grown --samples --sheet",
            "clipdr train --config jobs/configs/demo.toml --set train.data --set train.mode --set train.teachers "
            "--set train.teacher_scales --set train.syn_caption_sets --set train.run_name",
        )
    },
    "clipdr train --config jobs/configs/mobileclip_s0.toml --set train.dry_run": Run(),
    "clipdr reinforce --config jobs/configs/mobileclip2_reinforce.toml --set reinforce.dry_run": Run(),
    # Crashed on every run (ray.remote refused convert's functools.partial) until branch datacompdr's fix, which
    # added this test.
    "clipdr datacompdr --set datacompdr.source --set datacompdr.output": CoveredBy(
        ("tests/integration/test_datacompdr_cli.py::test_cli_converts_numbered_shards_through_ray",)
    ),
    # Studies and sweeps (docs/study.md): each trains several runs, so the toy runs are in the integration tests.
    "clipdr study --config jobs/configs/demo.toml --set study.seeds": CoveredBy((_DEMO_TEST,)),
    "clipdr study --config jobs/configs/demo.toml --set train.schedule.samples --set study.seeds --set "
    "study.parallel_jobs": CoveredBy((_DEMO_TEST,)),
    "clipdr sweep --config jobs/configs/demo.toml --set sweep.params": CoveredBy((_SWEEP_TEST,)),
    "clipdr sweep --config jobs/configs/demo.toml --set sweep.search --set sweep.num_samples --set sweep.params": (
        CoveredBy((_SWEEP_TEST,))
    ),
    # Train.
    "python jobs/train.py --config jobs/configs/demo.toml --set train.run_name": CoveredBy(
        ("tests/integration/test_train.py::test_resubmitted_run_resumes_after_the_driver_is_killed",)
    ),
    "python jobs/train.py --config jobs/configs/demo.toml --set train.mode --set train.run_name": CoveredBy(
        ("tests/integration/test_train.py::test_resubmitted_run_resumes_after_the_driver_is_killed",)
    ),
    "clipdr train --config jobs/configs/demo.toml --set train.run_name": CoveredBy(
        ("tests/integration/test_train.py::test_resubmitted_run_resumes_after_the_driver_is_killed",)
    ),
    "clipdr train --config jobs/configs/demo.toml --set train.mode --set train.run_name": CoveredBy(
        ("tests/integration/test_train.py::test_resubmitted_run_resumes_after_the_driver_is_killed",)
    ),
    "ray job submit --working-dir -- python jobs/train.py --config jobs/configs/demo.toml --set train.run_name": (
        CoveredBy(
            (
                "tests/integration/test_job_submit.py::test_ray_job_submit_reinforce_round_trip",
                "tests/integration/test_train.py::test_resubmitted_run_resumes_after_the_driver_is_killed",
            )
        )
    ),
    "mlflow ui --backend-store-uri": External("starts a web server that runs until stopped; test_demo checks the hint"),
    # docs/demo.md: the UI screenshot, and the demo on the second world family.
    "python scripts/ui_screenshot.py --store --experiment --output": External(
        "needs Chromium (a Debian package the CI machine may lack) and starts an MLflow server for minutes; "
        "tests/unit/test_ui_screenshot.py checks its chart URL and that it stops before starting anything without one"
    ),
    "clipdr demo --config jobs/configs/demo_world2.toml": CoveredBy(
        (
            "tests/integration/test_demo.py::test_demo_runs_every_stage_into_mlflow_and_caches",
            "tests/unit/test_synthetic.py::test_demo_world2_is_the_demo_lifecycle_on_the_tiles_family",
        )
    ),
    # Evaluate, export, promote.
    "clipdr evaluate --config jobs/configs/demo.toml --set evaluate.model": CoveredBy(
        ("tests/integration/test_lifecycle.py::test_evaluating_a_model_name_opens_a_linked_evaluation_run",)
    ),
    "clipdr export --config jobs/configs/demo.toml --set export.model": CoveredBy(
        ("tests/integration/test_export_cli.py::test_export_checkpoint_to_its_training_run",)
    ),
    "clipdr export --set export.model --set export.output": CoveredBy(
        ("tests/integration/test_export_cli.py::test_export_checkpoint_to_its_training_run",)
    ),
    # docs/export.md: the Core ML export is `clipdr export`'s own code with export.coreml; test_export.py runs it on
    # a tiny ViT (the CLI's loading and MLflow logging: test_export_cli.py), and test_docs_commands parses the key.
    "clipdr export --set export.model --set export.output --set export.coreml": CoveredBy(
        ("tests/unit/test_export.py::test_coreml_packages_have_the_documented_spec_ops_and_fp16_weights",)
    ),
    # docs/finetune.md: WiSE-FT after training needs a fine-tuning run in MLflow; the test publishes one as training
    # does and runs both commands at toy size.
    "clipdr evaluate --config jobs/configs/demo.toml --set evaluate.model --set evaluate.wise_alpha": CoveredBy(
        ("tests/unit/test_wiseft.py::test_evaluate_at_an_alpha_logs_it_as_a_param_of_its_own_run",)
    ),
    "clipdr export --set export.model --set export.wise_alpha --set export.output": CoveredBy(
        ("tests/unit/test_wiseft.py::test_export_at_alpha_0_and_1_gives_the_start_and_the_finetuned_bytes",)
    ),
    "clipdr promote --config jobs/configs/demo.toml": CoveredBy(
        ("tests/integration/test_lifecycle.py::test_promote_cli_prints_the_decision",)
    ),
    "clipdr promote --set lifecycle.model --set lifecycle.version --set lifecycle.metric": CoveredBy(
        ("tests/integration/test_lifecycle.py::test_promote_cli_prints_the_decision",)
    ),
    # Models.
    "clipdr models": CoveredBy(("tests/unit/test_models.py::test_models_stage_lists_every_variant_with_paper_counts",)),
    "python jobs/benchmark.py latency --quick": Run(_TOY_LATENCY),
    "python jobs/benchmark.py latency --batch-sizes --warmup --iters --output": Run(_TOY_LATENCY),
    "python jobs/benchmark.py train --output": Run(_TOY_TRAIN_BENCH),
    "python jobs/benchmark.py finetune --output": Run(_TOY_FINETUNE),
    "python jobs/benchmark.py train --io-only --output": Run(_TOY_TRAIN_BENCH),
    "clipdr inspect data/demo/reinforced --samples --sheet": CoveredBy(
        ("tests/unit/test_inspection.py::test_inspect_prints_the_manifest_and_captions_and_writes_the_views",)
    ),
    # docs/export.md: needs evaluation datasets and an export; the test makes a tiny world and measures the export
    # test_export.py makes anyway (--export: the same run without exporting again; --model only adds `clipdr export`'s
    # own code, which test_export.py and test_export_cli.py test).
    "python jobs/benchmark.py quantized --model --zeroshot --retrieval --output": CoveredBy(
        ("tests/unit/test_export.py::test_quantized_benchmark_measures_an_export_at_toy_size",)
    ),
    "python jobs/benchmark.py quantized --model --zeroshot --retrieval --max-samples --iters --warmup "
    "--output": CoveredBy(("tests/unit/test_export.py::test_quantized_benchmark_measures_an_export_at_toy_size",)),
    "mlflow models serve -m --env-manager -h -p": CoveredBy(
        (
            "tests/integration/test_serve.py::test_served_model_embeds_images_and_captions_as_the_model_does",
            "tests/integration/test_serve.py::test_a_malformed_request_gets_a_400_and_the_server_keeps_serving",
        )
    ),
    # docs/export.md, README: `clipdr serve` runs until stopped; the integration test starts it as the CLI (the
    # benchmark's `started`, which adds the port, host, alias and replicas), requests both endpoints and stops it.
    "clipdr serve --set serve.model": CoveredBy(
        (
            "tests/integration/test_serve.py::test_clipdr_serve_embeds_images_and_texts_as_the_registered_pyfunc_predicts",
            "tests/integration/test_serve.py::test_clipdr_serve_answers_a_malformed_request_with_a_4xx_and_goes_on_serving",
        )
    ),
    # --model starts `clipdr serve` (the `started` of the test above) and measures it; the test runs the same
    # `benchmarks.main` with --url against that server at toy size.
    "python jobs/benchmark.py serve --model --requests --concurrency --output": CoveredBy(
        ("tests/integration/test_serve.py::test_the_serve_load_test_runs_at_toy_size",)
    ),
    "python jobs/benchmark.py captioner": Run(_TOY_CAPTIONER),
    "python jobs/benchmark.py captioner --output": Run(_TOY_CAPTIONER),
    "python jobs/benchmark.py captioner --flops-models --rows --rounds --output": Run(_TOY_CAPTIONER),
    # Runs the reinforcement job on Ray: an integration test runs it at toy size on the suite's local Ray.
    "python jobs/benchmark.py reinforce --shards --shard-size --bound-shards --output": CoveredBy(
        ("tests/integration/test_benchmarks.py::test_reinforce_benchmark_runs_at_toy_size",)
    ),
    "python jobs/benchmark.py reinforce_scale --layouts --kill-layout --kill-after --output": CoveredBy(
        ("tests/integration/test_benchmarks.py::test_reinforce_scale_benchmark_runs_at_toy_size",)
    ),
    "python jobs/benchmark.py reinforce --sim-rate --sim-size --views --shards --shard-size --bound-shards "
    "--batch-size --captions --caption-len --rounds --warmup --output": External(
        "starts a Ray of its own (its workers inherit the trace dir), so it cannot share the suite's, and runs for "
        "minutes; the simulated teacher's busy accounting through the stages is tested by tests/unit/"
        "test_reinforce_stages.py::test_the_simulated_accelerator_runs_through_the_stages_and_accounts_its_busy_time"
    ),
    "python jobs/benchmark.py reinforce --sim-rate --sim-size --views --shards --shard-size --bound-shards "
    "--batch-size --captions --caption-len --rounds --warmup --ray-cpus --output": External(
        "the same benchmark as above with a local Ray of more logical CPUs: a Ray of its own, minutes"
    ),
    "python -m pytest -m": External("runs the slow test tier itself (2-3 minutes); its file is checked to exist"),
    # docs/reliability.md: memory measurements; each behaviour measured has its own test, named beside the figure.
    **{
        f"python -m tests.memory_figures {shape}": External(
            "a measurement quoted in docs/reliability.md (up to a minute, a local Ray for ray-read); the behaviour it "
            "measures is tested by the test named beside each figure"
        )
        for shape in (
            "header-bomb",
            "read-shard --images --hold",
            "read-shard --images --png-side",
            "ray-read --images --block-mib",
            "decode --mode",
        )
    },
    # infra/README.md: against the AWS cluster.
    "ray job submit --working-dir -- python jobs/reinforce.py --config jobs/configs/datacompdr12m.toml "
    "--set reinforce.source --set reinforce.output": CoveredBy(
        ("tests/integration/test_job_submit.py::test_ray_job_submit_reinforce_round_trip",)
    ),
    "ray job submit --working-dir -- python jobs/train.py --config jobs/configs/mobileclip_s0.toml --set train.data "
    "--set train.output --set train.run_name --set train.resources.workers": CoveredBy(
        (
            "tests/integration/test_job_submit.py::test_ray_job_submit_reinforce_round_trip",
            "tests/integration/test_train.py::test_resubmitted_run_resumes_after_the_driver_is_killed",
            "tests/unit/test_recipes.py::test_recipe_passes_the_training_checks_and_names_a_known_model",
        )
    ),
    # The same as `clipdr evaluate` (test_lifecycle) submitted like test_job_submit's job; evaluate.device=cuda is
    # the one part no test here can run.
    "ray job submit --entrypoint-num-gpus --working-dir -- python jobs/evaluate.py "
    "--config jobs/configs/mobileclip_s0.toml --set evaluate.model --set evaluate.device "
    "--set evaluate.zeroshot --set evaluate.retrieval": CoveredBy(
        (
            "tests/integration/test_job_submit.py::test_ray_job_submit_reinforce_round_trip",
            "tests/integration/test_lifecycle.py::test_evaluating_a_model_name_opens_a_linked_evaluation_run",
        )
    ),
}

# Programs of the cloud runbook and shell plumbing, which this machine cannot or need not run: every command of
# theirs is external for one reason. (Terraform's HCL is still checked offline: fmt and checkov in tests/infra.)
EXTERNAL_PROGRAMS: dict[str, str] = {
    "terraform": "needs provider downloads and an AWS account (fmt and checkov run in tests/infra)",
    "aws": "needs an AWS account",
    "docker": "needs a Docker engine and a registry to push to",
    "kubectl": "needs the EKS cluster",
    "envsubst": "templates a manifest for kubectl (the manifests' placeholders are checked in tests/infra)",
    "jq": "reads terraform outputs",
    "cd": "shell plumbing",
    "cp": "shell plumbing",
    "cat": "shell plumbing",
    "export": "shell plumbing",
    "eval": "shell plumbing",
}


def entry_for(command: DocCommand) -> Entry | None:
    if command.program in EXTERNAL_PROGRAMS:
        return External(EXTERNAL_PROGRAMS[command.program])
    return REGISTRY.get(command.shape)


# --------------------------------------------------------------------------- what a command runs


def job_stage(script: str) -> str | None:
    """The clipdr stage a ``jobs/*.py`` script runs (each is ``main(["<stage>", *sys.argv[1:]])``)."""
    match = re.search(r"""main\(\[\s*["'](\w+)["']""", (REPO / script).read_text())
    return match.group(1) if match else None


def stage_of(argv: tuple[str, ...]) -> str | None:
    """The clipdr stage a project command runs: ``clipdr <stage>``, or ``python jobs/<x>.py`` via its script."""
    program = program_of(argv)
    if program == "clipdr" and len(argv) > 1 and not argv[1].startswith("-"):
        return argv[1]
    if program == "python" and len(argv) > 1 and argv[1].startswith("jobs/"):
        return job_stage(argv[1]) if (REPO / argv[1]).is_file() else None
    return None


def config_args(argv: tuple[str, ...]) -> tuple[str | None, list[str]]:
    """The ``--config`` path and the ``--set`` overrides of a command, as argparse would read them."""
    config, overrides = None, []
    for i, word in enumerate(argv):
        name, eq, value = word.partition("=")
        if name in ("--config", "--set"):
            value = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
            if name == "--config":
                config = value
            else:
                overrides.append(value)
    return config, overrides


def repo_paths(argv: tuple[str, ...]) -> list[str]:
    """Arguments that name files of this repository (under one of `REPO_DIRS`), placeholders excepted."""
    paths = []
    for word in argv:
        value = word.partition("=")[2] if word.startswith("-") else word
        if value.split("/")[0] in REPO_DIRS and "/" in value and not re.search(r"[<$*]", value):
            paths.append(value)
    return paths


def strings_in_test(spec: str) -> set[str] | None:
    """The string constants in the test function ``path::name`` (stage names, script paths, ...); None when it
    does not exist."""
    path, _, name = spec.partition("::")
    file = REPO / path
    if not file.is_file():
        return None
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return {c.value for c in ast.walk(node) if isinstance(c, ast.Constant) and isinstance(c.value, str)}
    return None


def expected_invocations(command: DocCommand) -> tuple[tuple[str, ...], ...]:
    """What a covering test must name: the stage or its jobs/ script (one runs the other), and ``submit``."""
    groups: list[tuple[str, ...]] = []
    if command.program == "ray":
        groups.append(("submit",))
    inner = command.inner
    stage = stage_of(inner)
    script = next((w for w in inner[1:2] if w.startswith("jobs/")), None)
    if script:
        groups.append((script, Path(script).name, *([stage] if stage else [])))
    elif stage:
        groups.append((stage, f"jobs/{stage}.py", f"{stage}.py"))
    return tuple(groups)


def names_any(found: set[str], alternatives: tuple[str, ...]) -> bool:
    return any(n == a or n.endswith("/" + a) for n in found for a in alternatives)
