"""Anthropic's Messages API (`POST /v1/messages`, `POST /v1/messages/count_tokens`), as vLLM and SGLang serve it:
Claude Code, the `anthropic` SDK and frameworks' Anthropic clients drive the model through it. A request is
read as the chat completion it means and run by the chat endpoint (adapters/openai/chat.py: the same
templates, tool parsing, constrained calls and reasoning split); the reply and its stream are written back in
Anthropic's shapes."""
