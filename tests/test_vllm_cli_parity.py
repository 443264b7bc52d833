"""`vllm serve` command lines and environment as a vLLM deployment brings them to `agentserve serve`."""

from __future__ import annotations

import pytest

from agentserve.cli import build_parser, engine_config_from_args
from agentserve.testing import tiny_model_cached


def _config(*flags: str):  # type: ignore[no-untyped-def]
    return engine_config_from_args(build_parser().parse_args(["serve", str(tiny_model_cached("qwen2")), *flags]))


def test_vllm_api_key_from_the_environment_protects_the_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM reads the key from VLLM_API_KEY when --api-key is not given: a deployment that sets it there
    must not come up open."""
    monkeypatch.setenv("VLLM_API_KEY", "secret-from-env")
    assert _config("--port", "8000").server.api_key == "secret-from-env"
    assert _config("--port", "8000", "--api-key", "flag-key").server.api_key == ["flag-key"]  # the flag wins
    monkeypatch.delenv("VLLM_API_KEY")
    assert _config("--port", "8000").server.api_key is None


def test_help_shows_no_placeholder_defaults() -> None:
    """A field whose default is built by a factory (--lora-modules: {}) showed pydantic's placeholder."""
    assert "PydanticUndefined" not in build_parser()._subparsers._group_actions[0].choices["serve"].format_help()


def test_vllm_serve_flags_without_an_agentserve_option_are_taken_at_their_defaults() -> None:
    """A `vllm serve` command line carrying EngineArgs flags agentserve has no option for (at vLLM's defaults)
    starts the same engine as without them (they were 'unrecognized arguments' before)."""
    plain = _config()
    with_defaults = _config("--num-scheduler-steps", "1", "--preemption-mode", "recompute", "--cuda-graph-sizes", "512",
                            "--logprobs-mode", "raw_logprobs", "--limit-mm-per-prompt", "{}", "--ignore-patterns",
                            "original/**/*", "--no-enable-sleep-mode", "--disable-custom-all-reduce",
                            "--max-seq-len-to-capture", "8192", "--tokenizer-mode", "auto", "--stream-interval", "1",
                            "-O0", "--api-server-count", "1", "--max-log-len", "100", "--disable-fastapi-docs",
                            "--enable-prompt-tokens-details", "--disable-frontend-multiprocessing",
                            "--chat-template-content-format", "string", "--safetensors-load-strategy", "lazy",
                            "--scheduler-delay-factor", "0", "--data-parallel-backend", "mp", "--mamba-cache-dtype",
                            "auto", "--disable-mm-preprocessor-cache", "--enable-reasoning", "--no-headless",
                            "--no-enable-log-outputs", "--additional-config", "{}", "--num-redundant-experts", "0",
                            "--decode-context-parallel-size", "1", "--no-enable-dbo", "--aggregate-engine-logging",
                            "--enable-chunked-prefill")
    assert with_defaults.model_dump() == plain.model_dump()


def test_vllm_serve_http_flags_set_the_http_front_end() -> None:
    config = _config("--allowed-origins", '["https://app.example"]', "--allow-credentials", "--root-path", "/llm",
                     "--uvicorn-log-level", "info", "--disable-uvicorn-access-log", "--enable-force-include-usage",
                     "--exclude-tools-when-tool-choice-none", "--structured-outputs-config.backend", "xgrammar")
    http = config.server
    assert http.allowed_origins == ["https://app.example"] and http.allowed_methods == ["*"] and http.allow_credentials
    assert http.root_path == "/llm" and http.uvicorn_log_level == "info" and http.disable_uvicorn_access_log
    assert http.enable_force_include_usage and http.exclude_tools_when_tool_choice_none
    assert config.grammar_backend == "xgrammar"
    limits = _config("--h11-max-incomplete-event-size", "65536", "--h11-max-header-count", "64", "--no-enable-ssl-refresh")
    assert limits.server.h11_max_incomplete_event_size == 65536 and limits.server.h11_max_header_count == 64
    with pytest.raises(SystemExit):  # vLLM's form is a JSON list; a bare origin is a usage error naming the flag
        build_parser().parse_args(["serve", "m", "--allowed-origins", "https://app.example"])


@pytest.mark.parametrize("flags,says", [
    (("--enable-sleep-mode",), "--enable-sleep-mode: enable_sleep_mode=True is not supported: sleep mode"),
    (("--num-scheduler-steps", "8"), "--num-scheduler-steps: num_scheduler_steps=8 is not supported: multi-step"),
    (("--revision", "main"), "local model directories"),
    (("--num-gpu-blocks-override", "512"), "num_blocks"),
    (("--no-multi-step-stream-outputs",), "every step streams"),
    (("--otlp-traces-endpoint", "http://collector:4317"), "OpenTelemetry"),
    (("-O3",), "--compilation-config: compilation_config=3 is not supported"),
    (("--api-server-count", "4"), "one HTTP server process"),
    (("--middleware", "my_pkg.AuthMiddleware"), "no middleware is imported"),
    (("--chat-template-content-format", "openai"), "joined into one string"),
    (("--enable-server-load-tracking",), "/metrics"),
    (("--enable-ssl-refresh",), "restart it to serve a renewed certificate"),
    (("--no-enable-chunked-prefill",), "always chunks prefill"),
    (("--headless",), "run in the engine's process"),
    (("--uds", "/tmp/agentserve.sock"), "listens on --host and --port"),
    (("--data-parallel-rank", "1"), "data parallelism is not supported"),
    (("--enable-eplb",), "mixture-of-experts models are not supported"),
    (("--logits-processors", '["my.Processor"]'), "logit_bias"),
])
def test_a_vllm_serve_flag_asking_for_what_agentserve_does_not_do_names_itself(flags: tuple[str, ...],
                                                                                says: str) -> None:
    with pytest.raises(SystemExit) as error:
        _config(*flags)
    assert says in str(error.value)


def test_max_model_len_in_vllms_human_readable_forms(capsys: pytest.CaptureFixture[str]) -> None:
    """vLLM takes --max-model-len 32k (32,000), 32K (32,768) or 25.6k; agentserve refused every suffix."""
    assert _config("--max-model-len", "200").model.max_model_len == 200
    assert _config("--max-model-len", "0.2k").model.max_model_len == 200
    assert _config("--max-model-len", "1k").model.max_model_len == 1000
    assert _config("--max-model-len", "1K").model.max_model_len == 1024
    for bad in ("25.6K", "lots"):
        with pytest.raises(SystemExit):
            _config("--max-model-len", bad)
        assert "--max-model-len" in capsys.readouterr().err


def test_vllm_command_line_spellings(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """vLLM's FlexibleArgumentParser takes `--max_model_len` for `--max-model-len` and options from a YAML file
    (`--config`, overridden by the command line's flags); --max-model-len takes auto / -1 (the model's own
    length) and T suffixes. Before: "unrecognized arguments", --config read as --config-format."""
    from agentserve.cli import engine_config_from_args, parse_command_line

    model = str(tiny_model_cached("qwen2"))

    def config(*words: str):  # type: ignore[no-untyped-def]
        return engine_config_from_args(parse_command_line(["serve", *words]))

    under = config(model, "--max_model_len", "512", "--gpu_memory_utilization=0.5", "--served_model_name", "a", "b")
    assert under.model.max_model_len == 512 and under.cache.gpu_memory_utilization == 0.5
    assert under.model.served_model_name == ["a", "b"]
    yaml_file = tmp_path / "serve.yaml"
    yaml_file.write_text("max-model-len: 1k\nmax_num_seqs: 8\nserved-model-name: [x, y]\nenable-prefix-caching: false\n")
    from_file = config(model, "--config", str(yaml_file), "--max-num-seqs", "4")
    assert from_file.model.max_model_len == 1000 and from_file.scheduler.max_num_seqs == 4  # the command line wins
    assert from_file.model.served_model_name == ["x", "y"] and from_file.cache.enable_prefix_caching is False
    assert config("--config", str(yaml_file), model).model.served_model_name == ["x", "y"]  # MODEL after the flags
    assert config(model, "--max-model-len", "auto").model.max_model_len is None
    assert config(model, "--max-model-len", "-1").model.max_model_len is None
    from agentserve.cli import human_readable_int
    assert human_readable_int("1T") == 1024 ** 4 and human_readable_int("2t") == 2 * 10 ** 12
    with pytest.raises(ValueError, match="--config .*cannot read"):
        parse_command_line(["serve", model, "--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(SystemExit):  # no abbreviations: --max-model is not --max-model-len
        parse_command_line(["serve", model, "--max-model", "512"])
