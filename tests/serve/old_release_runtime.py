"""Run inside the vLLM venv with an old release's vllm/ first on PYTHONPATH: exercise its (patched or not) GLM-4.7 tool
parser and Anthropic stream converter on GLM-4.7 outputs, print what came out as JSON. Usage: python THIS TOKENIZER_DIR"""

import asyncio
import json
import sys

import vllm
from transformers import AutoTokenizer
from vllm.entrypoints.anthropic.serving import AnthropicServingMessages
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.tool_parsers.glm47_moe_tool_parser import Glm47MoeModelToolParser

OUTPUTS = {
    "glm47_no_newline": "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value>"
    "<arg_key>days</arg_key><arg_value>3</arg_value></tool_call>",
    "glm45_newline": "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n</tool_call>",
    "zero_args": "<tool_call>list_files</tool_call>",
    "text_then_call": "Let me check.<tool_call>get_weather<arg_key>city</arg_key><arg_value>Oslo</arg_value></tool_call>",
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            },
        },
    },
    {"type": "function", "function": {"name": "list_files", "parameters": {"type": "object", "properties": {}}}},
]


def parse_all(tokenizer) -> dict:
    request = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], tools=TOOLS)
    out = {}
    for key, text in OUTPUTS.items():
        info = Glm47MoeModelToolParser(tokenizer).extract_tool_calls(text, request)
        out[key] = {
            "called": info.tools_called,
            "calls": [[c.function.name, json.loads(c.function.arguments)] for c in info.tool_calls],
            "content": info.content,
        }
    return out


def stream_chunks() -> list[str]:
    """What vLLM 0.15's chat endpoint streams when the glm47 parser finds one call: role, then content "" + the whole call."""
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "m"}

    def chunk(delta, finish=None):
        return (
            "data: " + json.dumps({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}) + "\n\n"
        )

    call = {
        "index": 0,
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    usage = {**base, "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}}
    return [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "", "tool_calls": [call]}),
        chunk({}, finish="tool_calls"),
        "data: " + json.dumps(usage) + "\n\n",
        "data: [DONE]\n\n",
    ]


async def convert_stream() -> list[dict]:
    async def gen():
        for item in stream_chunks():
            yield item

    # The converter reads only stop_reason_map from the serving object; building a real one needs an engine.
    serving = object.__new__(AnthropicServingMessages)
    serving.stop_reason_map = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
    events = []
    async for raw in serving.message_stream_converter(gen()):
        for line in raw.splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[len("data: ") :]))
    return events


def main() -> None:
    tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
    print(
        json.dumps(
            {"vllm_file": vllm.__file__, "parser": parse_all(tokenizer), "stream": asyncio.run(convert_stream())}
        )
    )


if __name__ == "__main__":
    main()
