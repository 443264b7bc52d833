"""A chat template in the shape of Mistral's from tokenizer v11 on (Magistral, Devstral, Mistral Small 3.2): calls
written as `[TOOL_CALLS]name[ARGS]{arguments}`, no list, no ids. Test data for the tiny Mistral model (whose
tokenizer has [TOOL_CALLS] as a special token and [ARGS] as plain text)."""

MISTRAL_V11_TEMPLATE = r"""
{{- bos_token -}}
{%- if tools -%}{{- '[AVAILABLE_TOOLS]' + (tools | tojson) + '[/AVAILABLE_TOOLS]' -}}{%- endif -%}
{%- for message in messages -%}
{%- if message.role == 'system' -%}
{{- '[SYSTEM_PROMPT]' + message.content + '[/SYSTEM_PROMPT]' -}}
{%- elif message.role == 'user' -%}
{{- '[INST]' + message.content + '[/INST]' -}}
{%- elif message.role == 'assistant' -%}
{%- if message.content is string -%}{{- message.content -}}{%- endif -%}
{%- for tool_call in (message.tool_calls or []) -%}
{%- set arguments = tool_call.function.arguments -%}
{%- if arguments is not string -%}{%- set arguments = arguments | tojson -%}{%- endif -%}
{{- '[TOOL_CALLS]' + tool_call.function.name + '[ARGS]' + arguments -}}
{%- endfor -%}
{{- eos_token -}}
{%- elif message.role == 'tool' -%}
{{- '[TOOL_RESULTS]' + message.content + '[/TOOL_RESULTS]' -}}
{%- endif -%}
{%- endfor -%}
"""
