"""Proto <-> python for AgentService: messages, tools, sampling, sessions, turn events, usage, timing.

Bad input raises InvalidRequestError naming the field (the service maps it to INVALID_ARGUMENT).
"""

from __future__ import annotations

import json
from typing import Any, Optional, Sequence

from agentserve.errors import InvalidRequestError
from agentserve.grammar.interface import GrammarError
from agentserve.grammar.structural_tag import structural_tag_payload
from agentserve.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput
from agentserve.sampling_params import SamplingParams
from agentserve.service import agent_pb2 as pb
from agentserve.chat.messages import parse_json_object
from agentserve.chat.reasoning import ReplyReasoning
from agentserve.chat.reply import content_beside_calls
from agentserve.sessions.types import (SessionSnapshot, SessionState, TextEvent, Timing, ToolCallEvent,
                                       TurnEvent, TurnResult, Usage, timing_from_metrics)

_STATE = {
    SessionState.NEW: pb.SESSION_STATE_NEW,
    SessionState.RESIDENT: pb.SESSION_STATE_RESIDENT,
    SessionState.SWAPPED: pb.SESSION_STATE_SWAPPED,
    SessionState.EVICTED: pb.SESSION_STATE_EVICTED,
    SessionState.CLOSED: pb.SESSION_STATE_CLOSED,
}
# SamplingParams fields declared `optional` in the proto: copied only when the client set them.
_OPTIONAL_SAMPLING = frozenset(("temperature", "top_p", "top_k", "min_p", "max_tokens", "min_tokens", "seed",
                                "presence_penalty", "frequency_penalty", "repetition_penalty", "logprobs",
                                "thinking_token_budget"))
_EXCLUSIVE_CONSTRAINT_KEYS = ("regex", "choice", "grammar")


# --- messages and tools -----------------------------------------------------------------------------
def messages_from_proto(messages: Sequence[pb.Message]) -> list[dict[str, Any]]:
    out = []
    for m in messages:
        d: dict[str, Any] = {"role": m.role, "content": m.content or None}
        if m.tool_calls:
            d["tool_calls"] = [{"id": tc.id, "type": "function", "function": {"name": tc.name, "arguments": tc.arguments}}
                               for tc in m.tool_calls]
        if m.tool_call_id:
            d["tool_call_id"] = m.tool_call_id
        if m.name:
            d["name"] = m.name
        if m.token_ids:
            d["token_ids"] = list(m.token_ids)
        if m.reasoning_content:  # context for the template (thinking models' templates render it)
            d["reasoning_content"] = m.reasoning_content
        out.append(d)
    return out


def tools_from_proto(tools: Sequence[pb.Tool]) -> Optional[list[dict[str, Any]]]:
    out = []
    for i, t in enumerate(tools):
        params = parse_json_object(t.parameters_json, f"tools[{i}].parameters_json") if t.parameters_json else None
        fn: dict[str, Any] = {"name": t.name}  # OpenAI's key order (templates serialise tools as given)
        if t.description:
            fn["description"] = t.description
        fn["parameters"] = params
        out.append({"type": "function", "function": fn})
    return out or None


def template_kwargs_from_proto(text: str) -> Optional[dict[str, Any]]:
    """CreateSessionRequest's or GenerateRequest's chat_template_kwargs: a JSON object, or "" for none (its keys
    and values are checked by chat/template_kwargs.py)."""
    return parse_json_object(text, "chat_template_kwargs") if text else None


def message_to_proto(m: dict[str, Any]) -> pb.Message:
    msg = pb.Message(role=m.get("role", ""), content=m.get("content") or "", tool_call_id=m.get("tool_call_id", ""),
                     name=m.get("name", ""), token_ids=m.get("token_ids") or [],
                     reasoning_content=m.get("reasoning_content") or "")
    for tc in m.get("tool_calls") or []:
        fn = tc.get("function", {})
        args = fn.get("arguments", "")
        msg.tool_calls.add(id=tc.get("id", ""), name=fn.get("name", ""),
                           arguments=args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))
    return msg


# --- sampling ---------------------------------------------------------------------------------------
def _response_format_kwargs(response_format: Optional[pb.ResponseFormat]) -> dict[str, Any]:
    """The output constraint a response_format asks for, as SamplingParams keywords."""
    if response_format is None or response_format.type in ("", "text"):
        return {}
    kind = response_format.type
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        if not response_format.json_schema:
            raise InvalidRequestError("response_format.json_schema is empty")
        return {"json_schema": parse_json_object(response_format.json_schema, "response_format.json_schema")}
    if kind == "regex":
        return {"regex": response_format.regex}
    if kind == "choice":
        return {"choice": list(response_format.choice)}
    if kind == "grammar":
        return {"grammar": response_format.grammar}
    if kind == "structural_tag":
        try:  # checked here, so that INVALID_ARGUMENT names the field and the place inside it
            structural_tag_payload(response_format.structural_tag, "response_format.structural_tag")
        except GrammarError as e:
            raise InvalidRequestError(str(e)) from None
        return {"structural_tag": response_format.structural_tag}
    raise InvalidRequestError(f"response_format.type {kind!r} is not one of text, json_object, json_schema, "
                              "regex, choice, grammar, structural_tag")


def _tool_choice(tools: Optional[list[dict[str, Any]]], tool_choice: str) -> Any:
    """OpenAI's tool_choice value for the declared tools; None when tools are not in play."""
    if tool_choice and not tools:
        # Generate declares its tools in the request; a turn has its session's tools.
        raise InvalidRequestError("tool_choice needs tools: declare them in GenerateRequest.tools, or in "
                                  "CreateSessionRequest.tools for a session's turns")
    if not tools or tool_choice == "none":
        return None
    names = [t["function"]["name"] for t in tools]
    if tool_choice in ("", "auto", "required"):
        return tool_choice or "auto"
    if tool_choice in names:
        return {"type": "function", "function": {"name": tool_choice}}
    raise InvalidRequestError(f"tool_choice {tool_choice!r} is not auto, none, required or a declared tool "
                              f"({', '.join(names)})")


def sampling_from_proto(sp: pb.SamplingParams, response_format: Optional[pb.ResponseFormat] = None,
                        tools: Optional[list[dict[str, Any]]] = None, tool_choice: str = "",
                        defaults: Optional[dict[str, Any]] = None) -> SamplingParams:
    """`defaults`: the model's sampling defaults for the optional fields the request leaves unset
    (engine/generation_defaults.py)."""
    kw: dict[str, Any] = {"max_tokens": None, **(defaults or {})}
    kw.update((fd.name, value) for fd, value in sp.ListFields() if fd.name in _OPTIONAL_SAMPLING)
    if sp.stop:
        kw["stop"] = list(sp.stop)
    if sp.stop_token_ids:
        kw["stop_token_ids"] = list(sp.stop_token_ids)
    kw["ignore_eos"] = sp.ignore_eos
    if sp.logit_bias:
        kw["logit_bias"] = dict(sp.logit_bias)
    if sp.allowed_token_ids:
        kw["allowed_token_ids"] = list(sp.allowed_token_ids)
    if sp.bad_words:
        kw["bad_words"] = list(sp.bad_words)
    kw.update(_response_format_kwargs(response_format))
    choice = _tool_choice(tools, tool_choice)
    # Tools combine with a json_schema / json_object response_format (calls, or a typed final
    # answer); a regex or choice response_format wins over them.
    if choice is not None and not any(k in kw for k in _EXCLUSIVE_CONSTRAINT_KEYS):
        kw["tools"], kw["tool_choice"] = tools, choice
    try:
        return SamplingParams(**kw)
    except ValueError as e:
        raise InvalidRequestError(f"sampling: {e}") from None


# --- sessions and turns -----------------------------------------------------------------------------
def snapshot_to_proto(s: SessionSnapshot) -> pb.SessionInfo:
    info = pb.SessionInfo(
        session_id=s.session_id, model=s.model, adapter=s.adapter or "", state=_STATE[s.state], num_tokens=s.num_tokens,
        num_kv_tokens=s.num_kv_tokens, num_pages=s.num_pages, num_swapped_pages=s.num_swapped_pages,
        num_turns=s.num_turns, num_messages=s.num_messages, busy=s.busy, parent_id=s.parent_id or "",
        created_at=s.created_at, last_active_at=s.last_active_at, expires_at=s.expires_at, ttl_seconds=s.ttl_seconds,
        metadata=s.metadata, raw_tokens=s.raw_tokens, token_ids=s.token_ids or [],
        chat_template_kwargs=json.dumps(s.template_kwargs) if s.template_kwargs else "")
    # The history: the session's own replies are the model's text whole, but for the thinking, apart as
    # reasoning_content (with a reasoning parser: Session.shown_replies); an assistant message a client sent
    # with reasoning_content keeps it apart.
    for m in s.messages or []:
        info.messages.append(message_to_proto(m))
    return info


def usage_to_proto(u: Usage) -> pb.Usage:
    return pb.Usage(prompt_tokens=u.prompt_tokens, cached_tokens=u.cached_tokens, prefilled_tokens=u.prefilled_tokens,
                    completion_tokens=u.completion_tokens, swapped_in_tokens=u.swapped_in_tokens,
                    reasoning_tokens=u.reasoning_tokens)


def timing_to_proto(t: Timing) -> pb.Timing:
    return pb.Timing(queue_ms=t.queue_ms, prefill_ms=t.prefill_ms, ttft_ms=t.ttft_ms, decode_ms=t.decode_ms,
                     total_ms=t.total_ms, swap_in_ms=t.swap_in_ms, swap_wait_ms=t.swap_wait_ms)


def text_deltas(ev: TextEvent, return_token_ids: bool, top_n: int) -> list[tuple[str, pb.TextDelta]]:
    """One streamed delta as (event field, TextDelta) pairs: with a reasoning parser's split (`parts`) the
    thinking as `reasoning` before the answer as `text`, each with its own token ids and logprobs (`top_n`
    alternatives each: SamplingParams.logprobs); a delta with no text and nothing else to send is left out."""
    parts = ev.parts
    pieces = [("text", ev.text, ev.token_ids, ev.logprobs)] if parts is None else [
        ("reasoning", parts.reasoning, parts.reasoning_token_ids, parts.reasoning_logprobs),
        ("text", parts.content, parts.content_token_ids, parts.content_logprobs)]
    out = []
    for kind, piece, ids, logprobs in pieces:
        delta = pb.TextDelta(text=piece, token_ids=list(ids) if return_token_ids else [])
        for tid, position in zip(ids, logprobs or ()):
            delta.logprobs.append(_position_logprobs(tid, position, top_n))
        if piece or delta.token_ids or delta.logprobs:
            out.append((kind, delta))
    return out


def _token_logprob(token_id: int, lp: Logprob) -> pb.TokenLogprob:
    return pb.TokenLogprob(token_id=token_id, token=lp.decoded_token or "", logprob=max(lp.logprob, -9999.0),
                           rank=lp.rank)


def _position_logprobs(token_id: int, position: PositionLogprobs, top_n: int) -> pb.PositionLogprobs:
    """The sampled token's entry (always in `position`) and the `top_n` most likely, rank 1 first (the
    sampled token among them when it is one of them)."""
    out = pb.PositionLogprobs(sampled=_token_logprob(token_id, position[token_id]))
    for tid, lp in sorted(position.items(), key=lambda kv: kv[1].rank):
        if 1 <= lp.rank <= top_n:
            out.top.append(_token_logprob(tid, lp))
    return out


def turn_events_to_proto(ev: TurnEvent, return_token_ids: bool, top_logprobs: int = 0) -> list[pb.TurnEvent]:
    """The wire events for a turn event (none for an empty text delta, two for one that ends the thinking)."""
    if isinstance(ev, TextEvent):
        return [pb.TurnEvent(**{kind: delta}) for kind, delta in text_deltas(ev, return_token_ids, top_logprobs)]
    if isinstance(ev, ToolCallEvent):
        return [pb.TurnEvent(tool_call=pb.ToolCallDelta(index=ev.index, id=ev.id, name=ev.name,
                                                       arguments_delta=ev.arguments_delta))]
    assert isinstance(ev, TurnResult)
    message = message_to_proto(ev.message)
    if ev.parts is not None:  # a reasoning parser split the reply: the answer is the content
        message.content, message.reasoning_content = ev.parts.content, ev.parts.reasoning
    return [pb.TurnEvent(done=pb.TurnDone(
        message=message, finish_reason=ev.finish_reason, usage=usage_to_proto(ev.usage),
        timing=timing_to_proto(ev.timing), token_ids=ev.token_ids if return_token_ids else [],
        prompt_token_ids=ev.prompt_token_ids if return_token_ids else [], session=snapshot_to_proto(ev.session)))]


# --- stateless generation ---------------------------------------------------------------------------
def generate_done_to_proto(out: RequestOutput, received_at: float, content: Optional[str],
                           tool_calls: list[dict[str, Any]],
                           reasoning: Optional[ReplyReasoning] = None) -> pb.GenerateDone:
    """The final event of Generate; `content` and `tool_calls`: the reply parsed for tool calls
    (content None when tools were not parsed: the engine's text stands); `reasoning`: the reply's split
    with a reasoning parser (chat messages only), which makes `text` the answer alone."""
    comp: CompletionOutput = out.outputs[0]
    m = out.metrics
    usage = pb.Usage(prompt_tokens=len(out.prompt_token_ids), cached_tokens=m.num_cached_tokens if m else 0,
                     prefilled_tokens=m.num_prefilled_tokens if m else 0, completion_tokens=len(comp.token_ids))
    text, reasoning_content = comp.text if content is None else content, ""
    if reasoning is not None:
        reasoning_content, text = reasoning.split(text)
        text = content_beside_calls(text, bool(tool_calls))
        usage.reasoning_tokens = reasoning.markers.reasoning_tokens(out.prompt_token_ids, comp.token_ids)
    done = pb.GenerateDone(text=text, token_ids=comp.token_ids, finish_reason=comp.finish_reason or "stop",
                           usage=usage, timing=timing_to_proto(timing_from_metrics(m, received_at)),
                           reasoning_content=reasoning_content)
    for c in tool_calls:
        done.tool_calls.add(id=c["id"], name=c["function"]["name"], arguments=c["function"]["arguments"])
    if tool_calls and done.finish_reason == "stop":
        done.finish_reason = "tool_calls"
    return done
