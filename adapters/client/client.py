"""An async Python client for agentserve's native gRPC API (agentserve.v1.AgentService).

    async with AgentClient("127.0.0.1:50051", api_key=None) as client:
        session = await client.create_session(
            [{"role": "system", "content": "You are an agent."}, {"role": "user", "content": "Plan a trip."}],
            tools=[{"type": "function", "function": {"name": "search", "parameters": {...}}}])
        async for event in session.turn(max_tokens=128, temperature=0):   # streams TurnEvents
            if event.HasField("text"):          # `reasoning` events (a reasoning model's thinking) come first
                print(event.text.text, end="")
        result = await session.run_turn([{"role": "tool", "tool_call_id": "c1", "content": "..."}])
        print(result.reasoning_content, result.text, result.tool_calls, result.done.usage)
        child = await session.fork()
        await session.close()
        async for info in client.iter_sessions():                          # ListSessions, page by page
            print(info.session_id, info.num_turns)

Errors arrive as grpc.aio.AioRpcError (`.code()`, `.details()`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterable, Optional, Sequence, Union

import grpc

from agentserve.service import agent_pb2 as pb
from agentserve.service import agent_pb2_grpc as pb_grpc

MessageLike = Union[dict[str, Any], pb.Message]
ToolLike = Union[dict[str, Any], pb.Tool]

_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "max_tokens", "min_tokens", "seed", "stop",
                    "stop_token_ids", "ignore_eos", "presence_penalty", "frequency_penalty", "repetition_penalty",
                    "logit_bias", "allowed_token_ids", "bad_words", "logprobs", "thinking_token_budget")


def to_message(m: MessageLike) -> pb.Message:
    if isinstance(m, pb.Message):
        return m
    msg = pb.Message(role=m.get("role", ""), content=m.get("content") or "", tool_call_id=m.get("tool_call_id") or "",
                     name=m.get("name") or "", token_ids=list(m.get("token_ids") or []),
                     reasoning_content=m.get("reasoning_content") or "")
    for tc in m.get("tool_calls") or []:
        fn = tc.get("function", tc)
        args = fn.get("arguments", "")
        msg.tool_calls.add(id=tc.get("id") or "", name=fn.get("name") or "",
                           arguments=args if isinstance(args, str) else json.dumps(args))
    return msg


def to_tool(t: ToolLike) -> pb.Tool:
    if isinstance(t, pb.Tool):
        return t
    fn = t.get("function", t)
    params = fn.get("parameters")
    # OpenAI's shape (parameters: a schema) or the proto's (parameters_json: its JSON text).
    text = json.dumps(params) if params is not None else fn.get("parameters_json") or ""
    return pb.Tool(name=fn.get("name", ""), description=fn.get("description") or "", parameters_json=text)


def to_sampling(**kw: Any) -> pb.SamplingParams:
    unknown = set(kw) - set(_SAMPLING_FIELDS)
    if unknown:
        raise TypeError(f"unknown sampling parameters: {', '.join(sorted(unknown))}")
    sp = pb.SamplingParams()
    for name, value in kw.items():
        if value is None:
            continue
        if name == "stop":
            sp.stop.extend([value] if isinstance(value, str) else list(value))
        elif name == "stop_token_ids":
            sp.stop_token_ids.extend(value)
        elif name == "allowed_token_ids":
            sp.allowed_token_ids.extend(value)
        elif name == "bad_words":
            sp.bad_words.extend([value] if isinstance(value, str) else list(value))
        elif name == "logit_bias":  # a map field: {token id: bias}, JSON-style string keys accepted
            sp.logit_bias.update({int(k): float(v) for k, v in value.items()})
        else:
            setattr(sp, name, value)
    return sp


def to_response_format(rf: Union[None, str, dict[str, Any], pb.ResponseFormat]) -> Optional[pb.ResponseFormat]:
    if rf is None or isinstance(rf, pb.ResponseFormat):
        return rf
    if isinstance(rf, str):
        return pb.ResponseFormat(type=rf)
    kind = rf.get("type", "text")
    out = pb.ResponseFormat(type=kind)
    if kind == "json_schema":
        schema = rf.get("json_schema", rf.get("schema"))
        if isinstance(schema, dict) and "schema" in schema:  # OpenAI's {"name":..., "schema": {...}}
            schema = schema["schema"]
        out.json_schema = schema if isinstance(schema, str) else json.dumps(schema)
    elif kind == "regex":
        out.regex = rf["regex"]
    elif kind == "choice":
        out.choice.extend(rf["choice"])
    elif kind == "grammar":
        out.grammar = rf["grammar"]
    return out


@dataclass
class TurnOutcome:
    """A turn collected: its text, tool calls, and the final TurnDone (usage, timing, session); on a
    reasoning model (--reasoning-parser) `text` is the answer and `reasoning_content` the thinking."""
    text: str
    tool_calls: list[pb.ToolCall]
    done: pb.TurnDone
    events: list[pb.TurnEvent] = field(default_factory=list)
    reasoning_content: str = ""

    @property
    def usage(self) -> pb.Usage:
        return self.done.usage

    @property
    def token_ids(self) -> list[int]:
        return list(self.done.token_ids)


class Session:
    """A handle on a server-side session."""

    def __init__(self, client: "AgentClient", info: pb.SessionInfo) -> None:
        self.client = client
        self.info = info
        self.id = info.session_id

    def __repr__(self) -> str:
        return f"Session({self.id!r}, state={pb.SessionState.Name(self.info.state)}, tokens={self.info.num_tokens})"

    async def turn(self, messages: Iterable[MessageLike] = (), *, tool_choice: str = "",
                   response_format: Union[None, str, dict[str, Any], pb.ResponseFormat] = None,
                   expected_next_turn_ms: float = 0.0, return_token_ids: bool = False, priority: int = 0,
                   timeout: Optional[float] = None, **sampling: Any) -> AsyncIterator[pb.TurnEvent]:
        """Streams the turn's events: reasoning deltas (a reasoning model's thinking), text deltas,
        tool-call deltas, then `done` (TurnDone). Leaving the iteration early cancels the turn on the server."""
        req = pb.TurnRequest(session_id=self.id, messages=[to_message(m) for m in messages],
                             sampling=to_sampling(**sampling), tool_choice=tool_choice,
                             expected_next_turn_ms=expected_next_turn_ms, return_token_ids=return_token_ids,
                             priority=priority)
        rf = to_response_format(response_format)
        if rf is not None:
            req.response_format.CopyFrom(rf)
        call = self.client.stub.Turn(req, metadata=self.client.metadata, timeout=timeout)
        try:
            async for event in call:
                if event.HasField("done"):
                    self.info = event.done.session
                yield event
        finally:
            if not call.done():
                call.cancel()

    async def run_turn(self, messages: Iterable[MessageLike] = (), **kwargs: Any) -> TurnOutcome:
        """Runs a turn to completion and collects it."""
        text: list[str] = []
        reasoning: list[str] = []
        calls: dict[int, pb.ToolCall] = {}
        events = []
        done: Optional[pb.TurnDone] = None
        async for ev in self.turn(messages, **kwargs):
            events.append(ev)
            kind = ev.WhichOneof("event")
            if kind == "text":
                text.append(ev.text.text)
            elif kind == "reasoning":
                reasoning.append(ev.reasoning.text)
            elif kind == "tool_call":
                d = ev.tool_call
                call = calls.setdefault(d.index, pb.ToolCall())
                if d.id:
                    call.id = d.id
                if d.name:
                    call.name = d.name
                call.arguments += d.arguments_delta
            elif kind == "done":
                done = ev.done
        if done is None:
            raise RuntimeError("the turn ended without a TurnDone")
        tool_calls = list(done.message.tool_calls) or [calls[i] for i in sorted(calls)]
        return TurnOutcome(text="".join(text), tool_calls=tool_calls, done=done, events=events,
                           reasoning_content="".join(reasoning))

    async def fork(self, *, ttl_seconds: float = 0.0, metadata: Optional[dict[str, str]] = None) -> "Session":
        info = await self.client.stub.ForkSession(
            pb.ForkSessionRequest(session_id=self.id, ttl_seconds=ttl_seconds, metadata=metadata or {}),
            metadata=self.client.metadata)
        return Session(self.client, info)

    async def refresh(self, include_messages: bool = False, include_token_ids: bool = False) -> pb.SessionInfo:
        self.info = await self.client.stub.GetSession(
            pb.GetSessionRequest(session_id=self.id, include_messages=include_messages,
                                 include_token_ids=include_token_ids), metadata=self.client.metadata)
        return self.info

    async def close(self) -> pb.SessionInfo:
        resp = await self.client.stub.CloseSession(pb.CloseSessionRequest(session_id=self.id),
                                                   metadata=self.client.metadata)
        self.info = resp.session
        return self.info


class AgentClient:
    def __init__(self, address: str, *, api_key: Optional[str] = None,
                 options: Optional[Sequence[tuple[str, Any]]] = None,
                 credentials: Optional[grpc.ChannelCredentials] = None) -> None:
        """`credentials`: TLS for a server started with a certificate (--ssl-keyfile / --ssl-certfile), e.g.
        grpc.ssl_channel_credentials(root_certificates=open("ca.pem", "rb").read()); None is plain text."""
        self.address = address
        self.metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        channel_options = list(options or [
            ("grpc.max_receive_message_length", 256 * 2**20), ("grpc.max_send_message_length", 256 * 2**20)])
        self.channel = (grpc.aio.insecure_channel(address, options=channel_options) if credentials is None
                        else grpc.aio.secure_channel(address, credentials, options=channel_options))
        self.stub = pb_grpc.AgentServiceStub(self.channel)

    async def __aenter__(self) -> "AgentClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def create_session(self, messages: Iterable[MessageLike] = (), *, tools: Iterable[ToolLike] = (),
                             ttl_seconds: float = 0.0, cache_salt: str = "", adapter: str = "", model: str = "",
                             raw_tokens: bool = False, metadata: Optional[dict[str, str]] = None,
                             chat_template_kwargs: Optional[dict[str, Any]] = None) -> Session:
        """`chat_template_kwargs`: template variables every turn renders with (e.g. {"enable_thinking": False})."""
        info = await self.stub.CreateSession(pb.CreateSessionRequest(
            messages=[to_message(m) for m in messages], tools=[to_tool(t) for t in tools], ttl_seconds=ttl_seconds,
            cache_salt=cache_salt, adapter=adapter, model=model, raw_tokens=raw_tokens, metadata=metadata or {},
            chat_template_kwargs=json.dumps(chat_template_kwargs) if chat_template_kwargs else ""),
            metadata=self.metadata)
        return Session(self, info)

    def session(self, session_id: str) -> Session:
        """A handle on an existing session (no RPC)."""
        return Session(self, pb.SessionInfo(session_id=session_id))

    async def get_session(self, session_id: str, include_messages: bool = False,
                          include_token_ids: bool = False) -> Session:
        s = self.session(session_id)
        await s.refresh(include_messages, include_token_ids)
        return s

    async def list_sessions(self, page_size: int = 0, page_token: str = "") -> list[pb.SessionInfo]:
        """One page of this API key's tenant's sessions, in creation order: `page_size` of them (0: the
        server's default, 100; at most 1000) after `page_token`. Every session: `iter_sessions`; the
        next page's token: `list_sessions_page`."""
        return (await self.list_sessions_page(page_size, page_token))[0]

    async def list_sessions_page(self, page_size: int = 0,
                                 page_token: str = "") -> tuple[list[pb.SessionInfo], str]:
        """One page of sessions and the next page's token ("" after the last page)."""
        resp = await self.stub.ListSessions(pb.ListSessionsRequest(page_size=page_size, page_token=page_token),
                                            metadata=self.metadata)
        return list(resp.sessions), resp.next_page_token

    async def iter_sessions(self, page_size: int = 0) -> AsyncIterator[pb.SessionInfo]:
        """Every session, fetched a page at a time. Closing sessions while iterating is safe: every
        session still open is listed once; one created meanwhile may be listed too."""
        page_token = ""
        while True:
            sessions, page_token = await self.list_sessions_page(page_size, page_token)
            for s in sessions:
                yield s
            if not page_token:
                return

    async def generate(self, prompt: Optional[str] = None, *, prompt_token_ids: Optional[Sequence[int]] = None,
                       messages: Optional[Iterable[MessageLike]] = None, tools: Iterable[ToolLike] = (),
                       tool_choice: str = "", response_format: Union[None, str, dict[str, Any]] = None,
                       adapter: str = "", cache_salt: str = "", model: str = "", return_token_ids: bool = False,
                       priority: int = 0, timeout: Optional[float] = None,
                       chat_template_kwargs: Optional[dict[str, Any]] = None,
                       **sampling: Any) -> AsyncIterator[pb.GenerateEvent]:
        req = pb.GenerateRequest(prompt=prompt or "", prompt_token_ids=list(prompt_token_ids or []),
                                 messages=[to_message(m) for m in messages or []], tools=[to_tool(t) for t in tools],
                                 sampling=to_sampling(**sampling), tool_choice=tool_choice, adapter=adapter,
                                 cache_salt=cache_salt, model=model, return_token_ids=return_token_ids,
                                 priority=priority,
                                 chat_template_kwargs=json.dumps(chat_template_kwargs) if chat_template_kwargs else "")
        rf = to_response_format(response_format)
        if rf is not None:
            req.response_format.CopyFrom(rf)
        call = self.stub.Generate(req, metadata=self.metadata, timeout=timeout)
        try:
            async for event in call:
                yield event
        finally:
            if not call.done():
                call.cancel()

    async def generate_done(self, prompt: Optional[str] = None, **kwargs: Any) -> pb.GenerateDone:
        """Runs a stateless generation to completion; returns its GenerateDone."""
        done = None
        async for ev in self.generate(prompt, **kwargs):
            if ev.HasField("done"):
                done = ev.done
        if done is None:
            raise RuntimeError("the generation ended without a GenerateDone")
        return done

    async def list_models(self) -> list[pb.ModelInfo]:
        return list((await self.stub.ListModels(pb.ListModelsRequest(), metadata=self.metadata)).models)

    async def health(self) -> pb.HealthResponse:
        return await self.stub.Health(pb.HealthRequest(), metadata=self.metadata)

    async def load_adapter(self, name: str, path: str, replace: bool = False) -> pb.AdapterInfo:
        """Loads the PEFT LoRA directory `path`, on the server's filesystem, as `name`; `replace`
        reloads a name already loaded with new weights (else ALREADY_EXISTS)."""
        return await self.stub.LoadAdapter(pb.LoadAdapterRequest(name=name, path=path, replace=replace),
                                           metadata=self.metadata)

    async def unload_adapter(self, name: str, drain: bool = False) -> None:
        """Unloads `name`; with `drain`, even while requests or sessions use it (they finish on it)."""
        await self.stub.UnloadAdapter(pb.UnloadAdapterRequest(name=name, drain=drain), metadata=self.metadata)
