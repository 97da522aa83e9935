import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from sm120_quant.errors import UserError
from sm120_quant.models.tiny import build_tiny_model, tiny_name

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Get weather",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]
CONVERSATION = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "reasoning_content": "Need the tool.",
     "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                      "arguments": {"city": "Paris", "days": 2}}}]},
    {"role": "tool", "content": '{"temp": 21}'},
    {"role": "user", "content": "Thanks"},
]


def _reload_logits_match(folder, build_fn_name):
    from sm120_quant.models.load import load_model, resolve_source
    from sm120_quant.recipes.schema import ModelSpec

    spec = ModelSpec(id=f"tiny://{build_fn_name}")
    model = load_model(spec, resolve_source(spec))
    ids = torch.randint(0, 2000, (2, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        first = model(ids).logits
    resaved = folder.parent / f"{folder.name}-resaved"
    model.save_pretrained(resaved)
    again = AutoModelForCausalLM.from_pretrained(resaved, dtype=torch.bfloat16, experts_implementation="eager")
    with torch.no_grad():
        second = again(ids).logits
    return first, second, again


@pytest.mark.parametrize("name,fixture", [("glm47", "tiny_glm47"), ("glm47-flash", "tiny_glm47_flash")])
def test_save_reload_logits_match_exactly(name, fixture, request, tmp_path):
    folder = request.getfixturevalue(fixture)
    first, second, again = _reload_logits_match(folder, name)
    assert torch.equal(first, second)
    assert again.model.rotary_emb.inv_freq.dtype == torch.float32
    assert again.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32


@pytest.mark.parametrize("fixture,arch,n_tensors", [("tiny_glm47", "Glm4MoeForCausalLM", 183),
                                                    ("tiny_glm47_flash", "Glm4MoeLiteForCausalLM", 173)])
def test_checkpoint_layout_is_the_hub_layout(fixture, arch, n_tensors, request):
    folder = request.getfixturevalue(fixture)
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == [arch]
    assert config["num_nextn_predict_layers"] == 1 and config["num_hidden_layers"] == 4
    with safe_open(folder / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert len(keys) == n_tensors
        assert f.get_slice("model.layers.1.mlp.gate.e_score_correction_bias").get_dtype() == "F32"
        assert f.get_slice("model.layers.1.mlp.experts.7.gate_proj.weight").get_shape() == [128, 256]
        assert f.get_slice("model.layers.1.mlp.experts.7.down_proj.weight").get_shape() == [256, 128]
    assert not any("gate_up_proj" in k for k in keys)
    mtp = {k for k in keys if k.startswith("model.layers.4.")}
    for extra in ("eh_proj.weight", "enorm.weight", "hnorm.weight", "shared_head.norm.weight",
                  "shared_head.head.weight", "embed_tokens.weight", "mlp.experts.0.gate_proj.weight"):
        assert f"model.layers.4.{extra}" in mtp


def test_build_is_deterministic_and_cached(tmp_path, tiny_glm47):
    again = build_tiny_model("glm47", cache_dir=tmp_path)
    assert again != tiny_glm47
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (tiny_glm47 / name).read_bytes()
    assert build_tiny_model("glm47", cache_dir=tmp_path) == again


def test_unknown_tiny_model_is_a_user_error():
    with pytest.raises(UserError, match="tiny://glm47, tiny://glm47-flash"):
        tiny_name("tiny://glm5")
    assert tiny_name("zai-org/GLM-4.7") is None


def test_tokenizer_round_trips_and_keeps_glm_tokens(tiny_glm47):
    tok = AutoTokenizer.from_pretrained(tiny_glm47)
    text = "def f(x):\n    return x * 2  # 二倍 ✓\n<tool_call>run<arg_key>cmd</arg_key><arg_value>ls</arg_value></tool_call>"
    ids = tok(text).input_ids
    assert tok.decode(ids) == text
    for token in ("<tool_call>", "<arg_key>", "<think>", "</think>", "[gMASK]", "<|assistant|>", "<|observation|>"):
        assert len(tok(token).input_ids) == 1, token
    assert len(tok) == 2048


def test_chat_template_renders_a_tool_call_conversation_in_glm47_format(tiny_glm47):
    tok = AutoTokenizer.from_pretrained(tiny_glm47)
    text = tok.apply_chat_template(CONVERSATION, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert text.startswith("[gMASK]<sop><|system|>\n# Tools\n")
    assert '"name": "get_weather"' in text
    assert text.endswith(
        "<|system|>You are helpful.<|user|>Weather in Paris?<|assistant|><think>Need the tool.</think>"
        "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value>"
        "<arg_key>days</arg_key><arg_value>2</arg_value></tool_call>"
        '<|observation|><tool_response>{"temp": 21}</tool_response><|user|>Thanks<|assistant|><think>')
    no_think = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                       add_generation_prompt=True, enable_thinking=False)
    assert no_think == "[gMASK]<sop><|user|>hi<|assistant|></think>"
