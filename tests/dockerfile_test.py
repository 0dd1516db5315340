"""The Dockerfile's facts that can be checked without a Docker engine."""

from __future__ import annotations

import json
import re
import shlex
from importlib.metadata import PackageNotFoundError, requires

from conftest import ROOT
from packaging.requirements import Requirement
from packaging.version import Version

DOCKERFILE = ROOT / "Dockerfile"
BASE_IMAGE = re.compile(r"pytorch/pytorch:(?P<torch>[\d.]+)-cuda(?P<cuda>[\d.]+)-cudnn\d+-runtime")
STAGE_SCRIPTS = {"data_preparation.py", "unit_test.py", "train.py", "evaluate.py"}
WORKDIR = "/workspace/lora_finetuning"
MUST_IGNORE = {"data", "fine_tuned_model", "finetune_100_model", "merged_model", "**/checkpoints", ".venv", ".git"}


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comment lines dropped first, then continuation lines joined."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    steps = []
    for line in filter(str.strip, joined.splitlines()):
        name, args = line.split(None, 1)
        steps.append((name.upper(), args.strip()))
    return steps


def arguments_of(instruction: str) -> list[str]:
    return [args for name, args in instructions() if name == instruction]


def index_of(predicate) -> int:
    return next(i for i, (name, args) in enumerate(instructions()) if predicate(name, args))


def environment() -> dict[str, str]:
    return dict(pair.split("=", 1) for args in arguments_of("ENV") for pair in shlex.split(args))


def requirements() -> list[Requirement]:
    lines = (line.split("#", 1)[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines())
    return [Requirement(line) for line in lines if line]


def build_arguments() -> dict[str, str]:
    """The ARG defaults, which a `docker build --build-arg NAME=...` replaces."""
    return dict(args.split("=", 1) for args in arguments_of("ARG") if "=" in args)


def base_image() -> re.Match:
    (image,) = arguments_of("FROM")  # one stage: the image that runs is the image that was checked
    image = re.sub(r"\$\{(\w+)\}", lambda name: build_arguments()[name[1]], image)
    match = BASE_IMAGE.fullmatch(image)
    assert match, f"{image} is not an official pytorch/pytorch CUDA runtime tag"
    return match


def torch_requirements_of_installed(packages: list[Requirement]) -> list[tuple[str, Requirement]]:
    """The torch requirements that `packages`, as installed here, declare (plain or under their `torch` extra).

    The image resolves the same ranges from requirements.txt, so it gets these versions or newer ones.
    """
    found = []
    for package in packages:
        try:
            declared = [Requirement(text) for text in requires(package.name) or []]
        except PackageNotFoundError:
            continue
        for requirement in declared:
            if requirement.name == "torch" and (
                not requirement.marker or requirement.marker.evaluate({"extra": "torch"})
            ):
                found.append((package.name, requirement))
    return found


def test_base_image_is_a_cuda_12_runtime_with_a_torch_that_requirements_admit():
    match = base_image()
    torch_version = Version(match["torch"])
    assert Version(match["cuda"]).major == 12
    (torch_requirement,) = [r for r in requirements() if r.name == "torch"]
    assert torch_version in torch_requirement.specifier


def test_base_torch_satisfies_the_libraries_own_torch_requirements():
    torch_version = Version(base_image()["torch"])
    declared = torch_requirements_of_installed(requirements())
    assert any(name == "transformers" for name, _ in declared)  # transformers 5 ignores torch < 2.6
    for name, requirement in declared:
        assert torch_version in requirement.specifier, f"{name} needs {requirement}"


def test_every_requirement_is_installed_in_a_cached_layer_with_torch_pinned():
    assert requirements(), "requirements.txt lists no requirements"
    steps = instructions()
    copy_requirements = index_of(lambda name, args: name == "COPY" and args.split()[0] == "requirements.txt")
    copied_to = re.escape(steps[copy_requirements][1].split()[-1])
    install = index_of(lambda name, args: name == "RUN" and re.search(rf"pip install .*-r {copied_to}\b", args))
    copy_code = index_of(lambda name, args: name == "COPY" and args.split()[-2:] == [".", "."])
    assert copy_requirements < install < copy_code  # a code change reuses the installed layer
    # The base's torch is written to a constraints file that pip obeys, so no requirement can swap it.
    constraints = re.search(r"pip install .*?(?:-c|--constraint) (\S+)", steps[install][1])
    assert constraints and re.search(rf"torch==.*> {re.escape(constraints[1])}", steps[install][1])


def test_the_stage_scripts_and_modules_it_names_exist():
    text = DOCKERFILE.read_text()
    scripts = set(re.findall(r"\bpython (\w+\.py)\b", text)) | set(re.findall(r'"python", "(\w+\.py)"', text))
    modules = set(re.findall(r"\bpython -m ([\w.]+)", text))
    assert scripts >= STAGE_SCRIPTS
    assert [script for script in scripts if not (ROOT / script).is_file()] == []
    assert [module for module in modules if not (ROOT / (module.replace(".", "/") + ".py")).is_file()] == []


def test_runs_as_a_non_root_user_in_the_project_folder():
    user = arguments_of("USER")[-1].split(":")[0]
    assert user not in {"root", "0"}
    assert any("useradd" in args and user in args.split() for args in arguments_of("RUN"))
    assert arguments_of("WORKDIR")[-1] == WORKDIR
    assert index_of(lambda name, args: name == "USER") > index_of(
        lambda name, args: name == "RUN" and "pip install" in args
    )


def test_hugging_face_cache_is_a_volume():
    hf_home = environment()["HF_HOME"]
    volumes = [
        v for args in arguments_of("VOLUME") for v in (json.loads(args) if args.startswith("[") else args.split())
    ]
    assert hf_home in volumes


def patterns(path) -> set[str]:
    """The entries of an ignore file, without comments and surrounding slashes (Docker cleans them the same way)."""
    lines = (line.strip() for line in path.read_text().splitlines())
    return {line.strip("/") for line in lines if line and not line.startswith("#")}


def test_dockerignore_keeps_data_models_and_local_state_out():
    assert MUST_IGNORE <= patterns(ROOT / ".dockerignore")


def test_dockerignore_covers_everything_git_ignores():
    dockerignore = patterns(ROOT / ".dockerignore")
    missing = {entry for entry in patterns(ROOT / ".gitignore") if not {entry, f"**/{entry}"} & dockerignore}
    assert missing == set()


README = ROOT / "README.md"


def test_the_base_image_is_a_build_argument_declared_before_from():
    assert instructions()[0] == ("ARG", f"BASE_IMAGE={base_image()[0]}")
    assert arguments_of("FROM") == ["${BASE_IMAGE}"]


def docker_run_options(text: str) -> list[str]:
    """The options of each `docker run` command in `text`, leaving out the elided `docker run ... image`."""
    found = re.findall(r"docker run (.*?)lora-summarization", text, flags=re.DOTALL)
    return [options for options in found if options.strip() != "..."]


def test_every_docker_run_forwards_signals_and_leaves_time_for_a_checkpoint():
    runs = docker_run_options(README.read_text()) + docker_run_options(DOCKERFILE.read_text())
    assert len(runs) >= 3
    for options in runs:
        assert "--init" in options.split(), options  # a PID 1 that forwards SIGTERM to the stage and reaps
        stop_timeout = re.search(r"--stop-timeout (\d+)", options)
        assert stop_timeout and int(stop_timeout[1]) >= 60, options  # Docker's default: SIGKILL after 10 s


def test_readme_names_the_drivers_and_how_to_pick_another_cuda_build():
    text = " ".join(README.read_text().split())
    cuda = Version(base_image()["cuda"])
    assert f"CUDA {cuda}" in text and "--build-arg BASE_IMAGE=" in text
    assert f"--index-url https://download.pytorch.org/whl/cu{cuda.major}{cuda.minor}" in text
    assert re.search(r"driver \d{3}\.\d+(\.\d+)? or newer", text)
