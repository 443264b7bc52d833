"""A bounded, seeded fuzz of the HTTP API from its own OpenAPI schema (schemathesis): valid and
invalid requests to every operation; no response may be a 5xx. The app serves no /openapi.json
(openapi_url=None); the test takes the schema from `app.openapi()`, which is what that route
would serve. Counts per operation and the status histogram go to the test output (`-s`). A second
test gives valid bodies one lone surrogate each, which the generators never draw."""

from __future__ import annotations

import collections
import json
import random
import time
from typing import Any, Iterator

import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from agentserve.adapters.openai.app import create_app
from agentserve.adapters.openai.server import ServerThread
from agentserve.config import EngineConfig
from agentserve.engine.async_engine import AsyncEngine
from agentserve.engine.engine import Engine
from agentserve.testing.tiny import tiny_model_cached

# Per operation and generation mode; with 6 operations x 2 modes this stays well under 60 s on
# 2 CPU cores (a short context keeps every admitted generation short).
EXAMPLES_PER_OPERATION = 80
# An operation without a body takes only path and query strings (ids that miss: 404): fewer examples find what
# they can (a third of the run's requests went there, ~20 s of make test, thirty-seventh session).
EXAMPLES_PER_OPERATION_WITHOUT_BODY = 20
MAX_MODEL_LEN = 96
SEED = 20261202


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[ServerThread, dict]]:
    # LoRA on, so that its load/unload routes are in the schema and fuzzed too (random names and paths:
    # 400 / 404 / 409, never a 5xx).
    config = EngineConfig.from_kwargs(str(tiny_model_cached("qwen2")), device="cpu", num_blocks=512,
                                      served_model_name="tiny", max_model_len=MAX_MODEL_LEN, enable_lora=True,
                                      max_loras=1, max_lora_rank=8)
    aeng = AsyncEngine(Engine(config))
    app = create_app(aeng, config)
    thread = ServerThread(app).start()
    yield thread, app.openapi()
    thread.stop()
    aeng.shutdown()


def test_http_fuzz_from_openapi_has_no_server_errors(server: tuple[ServerThread, dict]) -> None:
    thread, raw_schema = server
    schema = schemathesis.openapi.from_dict(raw_schema)
    sent: collections.Counter[str] = collections.Counter()
    statuses: collections.Counter[int] = collections.Counter()
    server_errors: list[str] = []
    session = requests.Session()
    started = time.monotonic()
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/v1/models",
                                              "/v1/responses", "/v1/load_lora_adapter", "/v1/unload_lora_adapter"}
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=EXAMPLES_PER_OPERATION if op.body else EXAMPLES_PER_OPERATION_WITHOUT_BODY,
                      derandomize=True, database=None, deadline=None,
                      suppress_health_check=list(HealthCheck), phases=[hypothesis.Phase.generate])
            @given(case=op.as_strategy(generation_mode=mode))
            @hypothesis.seed(SEED)
            def send(case: schemathesis.Case) -> None:
                response = case.call(base_url=thread.url, session=session, timeout=60)
                sent[op.label] += 1
                statuses[response.status_code] += 1
                if response.status_code >= 500:
                    server_errors.append(f"{op.label} {response.status_code}: {case.body!r:.300} -> "
                                         f"{response.text[:300]}")

            try:
                send()
            except hypothesis.errors.Unsatisfiable:
                # An operation without a body whose parameters take any string (GET /health,
                # GET /v1/models/{model_id}) has no invalid request to generate.
                assert mode == GenerationMode.NEGATIVE and not op.body, op.label
    elapsed = time.monotonic() - started
    print(f"\nHTTP fuzz (schemathesis {schemathesis.__version__}, seed {SEED}): {sum(sent.values())} requests "
          f"in {elapsed:.1f} s; per operation {dict(sorted(sent.items()))}; "
          f"status codes {dict(sorted(statuses.items()))}")
    for label in ("POST /v1/completions", "POST /v1/chat/completions", "POST /v1/responses",
                  "POST /v1/load_lora_adapter"):  # the bodies to fuzz
        assert sent[label] == 2 * EXAMPLES_PER_OPERATION, sent
    assert not server_errors, "\n".join(server_errors[:10])


_KEY = object()  # marks a path to an object key rather than to a value
SURROGATE_EXAMPLES_PER_OPERATION = 12


def _string_paths(node: Any, path: tuple = ()) -> Iterator[tuple]:
    """Paths to every string leaf, and to every object key (as (..., _KEY, name)), of a JSON body."""
    if isinstance(node, str):
        yield path
    elif isinstance(node, dict):
        for k, v in node.items():
            yield (*path, _KEY, k)
            yield from _string_paths(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _string_paths(v, (*path, i))


def _with_surrogate(body: Any, path: tuple) -> Any:
    """A copy of `body` with a lone surrogate appended to the string (or key) at `path`."""
    if not path:
        return body + "\ud800"
    body = json.loads(json.dumps(body))
    *parents, last = path
    is_key = bool(parents) and parents[-1] is _KEY
    node = body
    for p in parents[:-1] if is_key else parents:
        node = node[p]
    if is_key:
        node[last + "\ud800"] = node.pop(last)
    else:
        node[last] = node[last] + "\ud800"
    return body


def test_lone_surrogates_anywhere_are_never_server_errors(server: tuple[ServerThread, dict]) -> None:
    """JSON can spell a lone surrogate ("\\ud800") that no tokenizer or UTF-8 encoder takes, and the
    generators above never produce one (they draw valid Unicode). Valid bodies of every operation, each
    with one of its strings or object keys given a lone surrogate: 4xx, never 5xx."""
    thread, raw_schema = server
    schema = schemathesis.openapi.from_dict(raw_schema)
    session = requests.Session()
    sent: collections.Counter[str] = collections.Counter()
    server_errors: list[str] = []
    rng = random.Random(SEED)
    for op in (result.ok() for result in schema.get_all_operations()):
        if not op.body:
            continue

        @settings(max_examples=SURROGATE_EXAMPLES_PER_OPERATION, derandomize=True, database=None, deadline=None,
                  suppress_health_check=list(HealthCheck), phases=[hypothesis.Phase.generate])
        @given(case=op.as_strategy(generation_mode=GenerationMode.POSITIVE))
        @hypothesis.seed(SEED)
        def send(case: schemathesis.Case) -> None:
            paths = list(_string_paths(case.body))
            if not paths:
                return
            body = _with_surrogate(case.body, rng.choice(paths))
            request = case.as_transport_kwargs(base_url=thread.url)
            request.pop("json", None)
            headers = {**request.pop("headers", {}), "Content-Type": "application/json"}
            # json.dumps escapes the surrogate (ensure_ascii): the bytes are valid JSON a client may send.
            response = session.request(**request, headers=headers, data=json.dumps(body).encode(), timeout=60)
            sent[op.label] += 1
            if response.status_code >= 500:
                server_errors.append(f"{op.label} {response.status_code}: {body!r:.300} -> {response.text[:300]}")

        send()
    print(f"\nlone-surrogate fuzz: {sum(sent.values())} requests; per operation {dict(sorted(sent.items()))}")
    assert sent["POST /v1/chat/completions"] > 0 and sent["POST /v1/messages"] > 0, sent
    assert not server_errors, "\n".join(server_errors[:10])
