"""The HTTP server's own options, under vllm serve's names and defaults: TLS, the proxy root path, CORS,
uvicorn's logging, the HTTP/1.1 parser's header limits, and two OpenAI-API behaviours vLLM puts behind flags. ServerConfig inherits them, so
they are engine options (LLM keywords, `agentserve serve` flags) like the rest of the server's. The TLS
certificate serves the gRPC port too (service/serve.py)."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

# vLLM's header limits (vllm/entrypoints/constants.py): h11's own limit of an unfinished event (a request's
# header block) is 16 KiB, which refuses the large bearer tokens and cookies that proxies add.
H11_MAX_INCOMPLETE_EVENT_SIZE_DEFAULT = 4 * 1024 * 1024
H11_MAX_HEADER_COUNT_DEFAULT = 256

# uvicorn's --log-level names (vLLM's --uvicorn-log-level takes the same).
UvicornLogLevel = Literal["critical", "error", "warning", "info", "debug", "trace"]


class HttpFrontendConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    ssl_keyfile: Optional[str] = Field(default=None, description="Private key file (PEM) of the server's TLS "
                                       "certificate; with ssl_certfile the HTTP API is served over HTTPS and the "
                                       "gRPC API over TLS. vLLM's flag.")
    ssl_certfile: Optional[str] = Field(default=None, description="Certificate file (PEM) of the HTTP server, with "
                                        "ssl_keyfile. vLLM's flag.")
    ssl_ca_certs: Optional[str] = Field(default=None, description="CA certificates (PEM) that client certificates are "
                                        "checked against (with ssl_cert_reqs 2: mutual TLS). vLLM's flag.")
    ssl_cert_reqs: int = Field(default=int(ssl.CERT_NONE), ge=0, le=2, description="Whether HTTPS clients must send a "
                               "certificate: 0 no, 1 optional, 2 required (Python's ssl.CERT_*). vLLM's flag.")
    ssl_ciphers: Optional[str] = Field(default=None, description="The TLS ciphers the HTTPS server offers (an OpenSSL "
                                       "cipher list; unset: uvicorn's default). vLLM's flag.")
    h11_max_incomplete_event_size: int = Field(default=H11_MAX_INCOMPLETE_EVENT_SIZE_DEFAULT, ge=1024, description=(
        "Bytes the HTTP/1.1 parser buffers for an unfinished request head (the request line and headers; the body "
        "is streamed and bounded by max_body_bytes); a larger head is refused. vLLM's flag and default (4 MiB)."))
    h11_max_header_count: int = Field(default=H11_MAX_HEADER_COUNT_DEFAULT, ge=1, description=(
        "Headers an HTTP request may carry; more are refused with 431. vLLM's flag and default."))
    root_path: Optional[str] = Field(default=None, description="The path prefix a proxy serves the HTTP API under "
                                     "(ASGI root_path: the proxy strips it; links and docs carry it). vLLM's flag.")
    uvicorn_log_level: UvicornLogLevel = Field(default="warning", description="Log level of the HTTP server (uvicorn); "
                                               "'info' also logs each request line. vLLM's flag (vLLM's default: info).")
    disable_uvicorn_access_log: bool = Field(default=False, description="No access log line per HTTP request at any "
                                             "log level. vLLM's flag.")
    allowed_origins: list[str] = Field(default=["*"], description="CORS: origins a browser page may call the HTTP API "
                                       "from (JSON list; '*' any). vLLM's flag and default.")
    allowed_methods: list[str] = Field(default=["*"], description="CORS: the methods allowed (JSON list). vLLM's flag.")
    allowed_headers: list[str] = Field(default=["*"], description="CORS: the request headers allowed (JSON list). "
                                       "vLLM's flag.")
    allow_credentials: bool = Field(default=False, description="CORS: whether browsers may send cookies and "
                                    "credentials cross-origin. vLLM's flag.")
    enable_force_include_usage: bool = Field(default=False, description="Streams end with a usage chunk even when the "
                                             "request did not ask for one (stream_options.include_usage). vLLM's flag.")
    exclude_tools_when_tool_choice_none: bool = Field(default=False, description="A chat request with tool_choice "
                                                      "'none' renders its prompt without the tools (by default the "
                                                      "template still lists them). vLLM's flag.")

    @model_validator(mode="after")
    def _check_tls(self) -> "HttpFrontendConfig":
        if (self.ssl_keyfile is None) != (self.ssl_certfile is None):
            raise ValueError("ssl_keyfile and ssl_certfile go together: give both (HTTPS) or neither (HTTP)")
        for name, path in (("ssl_keyfile", self.ssl_keyfile), ("ssl_certfile", self.ssl_certfile),
                           ("ssl_ca_certs", self.ssl_ca_certs)):
            if path is not None and not Path(path).expanduser().is_file():
                raise ValueError(f"{name} {path!r} is not a file")
        if self.ssl_cert_reqs != ssl.CERT_NONE and self.ssl_ca_certs is None:
            raise ValueError("ssl_cert_reqs 1 or 2 checks client certificates against ssl_ca_certs: give ssl_ca_certs")
        return self
