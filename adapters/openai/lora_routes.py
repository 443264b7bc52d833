"""vLLM's runtime LoRA endpoints: POST /v1/load_lora_adapter {"lora_name", "lora_path"} and POST
/v1/unload_lora_adapter {"lora_name"} (plus agentserve's "drain": unload even while requests use it;
they finish on its weights). Answers: 200 with a plain-text success line (vLLM's), 400 for a bad
adapter directory (the message names the file or field) or a bad name (empty, padded, control
characters), 404 for an unknown adapter or a server without LoRA, 409 when the name is taken (the
base model's, or a loaded adapter's without `load_inplace`) or in use by requests or open sessions
(the message names them). Loading a name that is already loaded needs vLLM's `load_inplace: true`;
it then replaces its weights as a new cache generation: no KV computed under the old weights is reused.

The adapter is read off the event loop and off the step thread (file reads grow with its size);
only binding the name runs on the step thread, like every change the step reads."""

from __future__ import annotations

import asyncio
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from agentserve.errors import (AdapterInUseError, AdapterNameError, AdapterNameTakenError, AdapterNotFoundError,
                               LoRANotEnabledError)
from agentserve.lora.adapter import LoRAAdapterError
from agentserve.service.tenants import ANONYMOUS, tenant_of_scope


class LoadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # vLLM clients may send lora_int_id etc.; they change nothing here
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)
    # Strict: "yes" or 1 must not replace a loaded adapter's weights by accident.
    load_inplace: StrictBool = False


class UnloadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # vLLM's optional lora_int_id is accepted and ignored
    lora_name: str = Field(min_length=1)
    drain: StrictBool = False  # strict: "no" must not read as true and unload under running requests


def _error(status: int, message: str, param: Optional[str], code: str) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status)


def install_lora_error_handlers(app: FastAPI) -> None:
    """Adapter errors raised anywhere in a request (a name unloaded between the check of a request's
    `model` and its admission, too) map to their statuses, not to 500."""

    @app.exception_handler(AdapterNotFoundError)
    async def _not_found(request: Request, exc: AdapterNotFoundError) -> JSONResponse:
        # In a load / unload the name is lora_name; in any other request (chat, completions,
        # responses, tokenize) it came as `model`.
        return _error(404, str(exc), "lora_name" if request.url.path.endswith("_lora_adapter") else "model",
                      "model_not_found")

    @app.exception_handler(LoRANotEnabledError)
    async def _not_enabled(request: Request, exc: LoRANotEnabledError) -> JSONResponse:
        return _error(404, str(exc), None, "lora_not_enabled")

    @app.exception_handler(AdapterInUseError)
    async def _in_use(request: Request, exc: AdapterInUseError) -> JSONResponse:
        return _error(409, str(exc), "lora_name", "adapter_in_use")

    @app.exception_handler(AdapterNameTakenError)
    async def _name_taken(request: Request, exc: AdapterNameTakenError) -> JSONResponse:
        return _error(409, str(exc), "lora_name", "lora_name_taken")

    @app.exception_handler(AdapterNameError)
    async def _bad_name(request: Request, exc: AdapterNameError) -> JSONResponse:
        return _error(400, str(exc), "lora_name", "invalid_lora_name")

    @app.exception_handler(LoRAAdapterError)
    async def _bad_adapter(request: Request, exc: LoRAAdapterError) -> JSONResponse:
        return _error(400, str(exc), "lora_path", "invalid_lora_adapter")


def add_lora_routes(app: FastAPI, async_engine: Any) -> None:
    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoRAAdapterRequest, raw_request: Request) -> PlainTextResponse:
        control, tenant = async_engine.engine.lora, _manager_tenant(raw_request)
        prepared = await asyncio.to_thread(control.read, body.lora_name, body.lora_path, body.load_inplace, tenant)
        await async_engine.run(lambda: control.install(prepared, body.load_inplace, tenant))
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, raw_request: Request) -> PlainTextResponse:
        control, tenant = async_engine.engine.lora, _manager_tenant(raw_request)
        await async_engine.run(lambda: control.unload(body.lora_name, drain=body.drain, tenant=tenant))
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


def _manager_tenant(raw_request: Request) -> Optional[str]:
    """The caller's tenant under API keys (adapters it loads are its to replace and unload); None without."""
    tenant = tenant_of_scope(raw_request.scope)
    return None if tenant.name == ANONYMOUS else tenant.name
