"""What a newcomer meets first on the command line: usage errors instead of tracebacks, a one-line
error for a port in use, help on every flag, `agentserve proto`, --served-model-name."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from agentserve.cli import build_parser, engine_config_from_args
from conftest_grpc import model_path

REPO = Path(__file__).resolve().parents[1]
SOURCE_PROTO = REPO / "proto" / "agentserve" / "v1" / "agent.proto"


def agentserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agentserve.cli", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("command", [["serve", "--grpc-port", "0"], ["generate", "--prompt", "hi"]])
def test_a_missing_model_is_a_usage_error(command: list[str]) -> None:
    run = agentserve(*command)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.startswith("usage: agentserve ") and "the following arguments are required: --model" in run.stderr


def test_serve_takes_the_model_positionally_as_vllm_serve_does() -> None:
    path = model_path()
    config = engine_config_from_args(build_parser().parse_args(["serve", path, "--port", "0"]))
    assert config.model.model == path and config.server.http_port == 0
    same = engine_config_from_args(build_parser().parse_args(["serve", path, "--model", path, "--port", "0"]))
    assert same.model.model == path
    run = agentserve("serve", path, "--model", path + "-other", "--port", "0")
    assert run.returncode == 2 and "Traceback" not in run.stderr and "name different models" in run.stderr


@pytest.mark.parametrize("flag,value", [("--port", "99999"), ("--grpc-port", "-1"), ("--http-port", "70000")])
def test_a_port_out_of_range_is_a_one_line_error(flag: str, value: str) -> None:
    run = agentserve("serve", "--model", model_path(), flag, value)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert ("less than or equal to 65535" if value.isdigit() else "greater than or equal to 0") in run.stderr
    assert run.stderr.startswith("agentserve: error: --") and value in run.stderr


def test_help_and_flag_errors_answer_before_torch_is_imported() -> None:
    """Torch, the engine and the servers load only once the flags are known good: a typo is answered at once."""
    script = ("import sys\nfrom agentserve.cli import main\n"
              "try:\n    main(['serve', '--help'])\nexcept SystemExit:\n    pass\n"
              f"code = main(['serve', {model_path()!r}, '--port', '99999'])\n"
              "print(code, sorted(m for m in ('torch', 'transformers', 'agentserve.engine') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.stdout.splitlines()[-1] == "2 []", (run.stdout, run.stderr)
    assert "--port" in run.stdout and "less than or equal to 65535" in run.stderr


def test_serve_without_a_port_says_which_flags_to_give() -> None:
    run = agentserve("serve", "--model", model_path())
    assert (run.returncode, run.stderr) == (2, "agentserve serve: error: give --grpc-port and/or --http-port\n")


@pytest.mark.parametrize("flag", ["--grpc-port", "--http-port"])
def test_a_port_in_use_is_a_one_line_error(flag: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = agentserve("serve", "--model", model_path(), "--device", "cpu", flag, str(port))
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr == (f"agentserve serve: error: cannot listen on 127.0.0.1:{port} ({flag}): "
                          "address already in use\n")


def subcommand_parsers() -> dict[str, argparse.ArgumentParser]:
    (subparsers,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(subparsers.choices)


@pytest.mark.parametrize("command", ["serve", "generate", "tiny-model", "demo", "bench"])
def test_every_flag_has_help(command: str) -> None:
    # argparse has no public list of a parser's arguments; _actions is what format_help() walks.
    missing = [a.dest for a in subcommand_parsers()[command]._actions if not (a.help or "").strip()]
    assert missing == []


def test_engine_flags_show_their_pydantic_defaults() -> None:
    text = subcommand_parsers()["serve"].format_help()
    assert "Tokens per KV page. (default: 16)" in " ".join(text.split())
    assert "--no-enable-prefix-caching" in text and "{fcfs,priority}" in text


def test_served_model_name_takes_several_names() -> None:
    args = build_parser().parse_args(["serve", "--model", "/m/tiny", "--served-model-name", "agent", "agent-v2"])
    model = engine_config_from_args(args).model
    assert model.served_model_names() == ["agent", "agent-v2"]
    args = build_parser().parse_args(["serve", "--model", "/m/tiny"])
    assert engine_config_from_args(args).model.served_model_names() == ["tiny"]


def test_proto_prints_the_installed_copy_of_the_source_proto() -> None:
    run = agentserve("proto")
    assert run.returncode == 0
    installed = Path(run.stdout.strip())
    assert installed.name == "agent.proto" and installed.read_bytes() == SOURCE_PROTO.read_bytes(), (
        "agentserve/service/agent.proto differs from proto/agentserve/v1/agent.proto: run "
        "python -m agentserve.service.gen_stubs")


def test_the_proto_is_package_data() -> None:
    # setuptools' build_py copies exactly what a wheel would carry (packages and their package data).
    with tempfile.TemporaryDirectory() as build:
        run = subprocess.run([sys.executable, "-c", "from setuptools import setup; setup()", "-q", "build_py",
                              "-d", build], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        assert (Path(build) / "agentserve" / "service" / "agent.proto").read_bytes() == SOURCE_PROTO.read_bytes()


def test_the_install_stamp_is_per_interpreter() -> None:
    # A second venv is another interpreter path (its python is a link to the same binary): `make test`
    # there must install into it, not trust the first venv's stamp. -B: print the recipe even where
    # this interpreter is installed already.
    def stamp_of(python: str) -> str:
        run = subprocess.run(["make", "-n", "-B", "install", f"PYTHON={python}"], cwd=REPO, capture_output=True,
                             text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        (touch,) = [line for line in run.stdout.splitlines() if line.startswith("touch ")]
        return touch.split()[1]

    with tempfile.TemporaryDirectory() as other_venv:
        other_python = Path(other_venv) / "python3"
        other_python.symlink_to(sys.executable)
        ours, theirs = stamp_of(sys.executable), stamp_of(str(other_python))
    assert ours.startswith(".venv-stamp-") and theirs.startswith(".venv-stamp-") and ours != theirs


def test_vllm_short_flags() -> None:
    short = build_parser().parse_args(["serve", "/m/tiny", "-tp", "2", "-q", "fp8"])
    long = build_parser().parse_args(["serve", "/m/tiny", "--tensor-parallel-size", "2", "--quantization", "fp8"])
    assert vars(short) == vars(long) and long.tensor_parallel_size is not None and long.quantization == "fp8"
