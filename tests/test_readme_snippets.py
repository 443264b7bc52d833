"""The README's Python API snippet and its gRPC client snippet run as written.

Each snippet is taken from README.md and run in a fresh interpreter; the only change is its
`MODEL = ...` or `ADDRESS = ...` line, which the README itself marks as the place to point at a
model or a server, here the tiny model and a server on a free port.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

from conftest_grpc import make_config, model_path

from agentserve.service.serve import running_server

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPET_TIMEOUT_S = 600  # a fresh interpreter imports torch; the test machine is shared


def readme_snippet(marker: str) -> str:
    """The one ```python block of the README that contains `marker`."""
    blocks = re.findall(r"^```python\n(.*?)^```$", README.read_text(), flags=re.S | re.M)
    found = [b for b in blocks if marker in b]
    assert len(found) == 1, f"expected one README python block with {marker!r}, found {len(found)}"
    return found[0]


def with_variable(snippet: str, name: str, value: str) -> str:
    pattern = re.compile(rf"^{name} = .*$", flags=re.M)
    assert len(pattern.findall(snippet)) == 1, f"the snippet must set {name} on one line of its own"
    return pattern.sub(lambda _: f"{name} = {value!r}", snippet)


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=SNIPPET_TIMEOUT_S)


def test_python_api_snippet_runs_as_written() -> None:
    code = with_variable(readme_snippet("from agentserve import LLM"), "MODEL", model_path())
    run = run_python(code)
    assert run.returncode == 0, run.stderr
    # print(text, finish_reason) of the 32-token completion, then the chat reply
    assert re.search(r" (length|stop)\n", run.stdout), run.stdout

async def _run_grpc_snippet() -> tuple[subprocess.CompletedProcess[str], list[int]]:
    """Runs the snippet against a server; returns its run and the turns of each session left."""
    async with running_server(make_config()) as handle:
        code = with_variable(readme_snippet("AgentClient(ADDRESS)"), "ADDRESS", handle.address)
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code, stdout=subprocess.PIPE,
                                                    stderr=subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), SNIPPET_TIMEOUT_S)
        turns = [s.num_turns for s in await handle.store.list()]
    assert proc.returncode is not None
    return subprocess.CompletedProcess([], proc.returncode, out.decode(), err.decode()), turns


def test_grpc_snippet_runs_as_written() -> None:
    run, turns = asyncio.run(_run_grpc_snippet())
    assert run.returncode == 0, run.stderr
    assert turns == [2], "the snippet runs two turns on one session"
    assert run.stdout.startswith("get_weather "), run.stdout  # print(call.name, call.arguments, ...)
    # The second turn's last print: its prefilled and cached tokens. Only the tool message is
    # prefilled; the first turn's tokens come from the session's resident pages.
    counts = re.search(r"(\d+) (\d+)\n$", run.stdout)
    assert counts is not None, run.stdout
    prefilled, cached = int(counts[1]), int(counts[2])
    assert cached > 0 and prefilled < cached, run.stdout
