"""Every diffusers denoiser with a tiny config in diffusers' own tests (tests/model_zoo_configs.py) gets SaRA defaults
that adapt the attention and feed-forward weights of every repeated block, and then trains, reloads, merges and exports.

One module-scoped run per class does the work (build, inject with no ``target_modules``, one step, save, reload,
merge, export); the tests read its record, so each class is built and trained once.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from model_zoo_configs import ZOO, ZooModel, build, inputs, output_tensor
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from torch import nn

from peft_sara import SaRAConfig
from peft_sara.conversion import convert_to_lora, export_adapter
from peft_sara.tuner.targets import block_lists, coverage

pytestmark = pytest.mark.usefixtures("one_thread")

# Layers inside a block that every default must adapt: all Linear layers below an attention module, and all Linear /
# ungrouped Conv layers below a feed-forward module (found by class or attribute name, independently of the rule).
ATTENTION_CLASS = re.compile(r"Attention")
FEED_FORWARD_CLASS = re.compile(r"FeedForward|SwiGLU|MLP|GLUMBConv")
FEED_FORWARD_ATTRIBUTE = re.compile(r"^(ff|ffn|mlp|feed_forward|ff_context|ff_i|ff_t|audio_ff|img_mlp|txt_mlp)$")


@dataclass
class ZooRun:
    """What one class did under the defaults."""

    peft_model: PeftModel
    block_layers: dict[str, list[str]]  # block name -> its attention / feed-forward layers that must be adapted
    adapted: set[str]
    loss: float
    base_unchanged: bool
    adapter_changed: bool
    trained_output: torch.Tensor
    reloaded_output: torch.Tensor
    merged_output: torch.Tensor
    config_targets: list[str]
    lora_output: torch.Tensor | None
    lora_problem: str | None  # why PEFT could not run the exported LoRA, if it could not
    lora_error: float
    changed_layers: set[str]  # adapted layers whose update is not zero after the step
    kohya_keys: set[str]


def _must_adapt(model: nn.Module) -> dict[str, list[str]]:
    """For each repeated block, the names of its attention and feed-forward layers."""
    named = dict(model.named_modules())
    blocks: dict[str, list[str]] = {}
    for list_name in block_lists(model):
        for index, _ in enumerate(named[list_name]):
            block = f"{list_name}.{index}"
            must = []
            for name, module in named.items():
                if not name.startswith(f"{block}.") or not isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv3d)):
                    continue
                if getattr(module, "groups", 1) != 1:
                    continue
                parts = name[len(block) + 1 :].split(".")
                ancestors = [named[f"{block}.{'.'.join(parts[:depth])}"] for depth in range(1, len(parts))]
                in_attention = any(ATTENTION_CLASS.search(type(a).__name__) for a in ancestors)
                in_feed_forward = any(FEED_FORWARD_CLASS.search(type(a).__name__) for a in ancestors) or any(
                    FEED_FORWARD_ATTRIBUTE.match(part) for part in parts[:-1]
                )
                if (in_attention and isinstance(module, nn.Linear)) or in_feed_forward:
                    must.append(name)
            blocks[block] = must
    return blocks


def _base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name.replace(".base_layer", ""): tensor.detach().clone()
        for name, tensor in model.state_dict().items()
        if "sara_" not in name
    }


def _run(entry: ZooModel, root: Path) -> ZooRun:
    model = build(entry)
    must = _must_adapt(model)
    model_inputs = inputs(entry)
    peft_model = get_peft_model(model, SaRAConfig(trainable_fraction=0.05))
    adapted = {
        name.removeprefix("base_model.model.")
        for name, module in peft_model.named_modules()
        if isinstance(module, BaseTunerLayer)
    }
    before = _base_weights(peft_model.base_model.model)
    adapter_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}

    peft_model.train()
    optimizer = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(2)
    prediction = output_tensor(peft_model(**model_inputs))
    loss = (prediction - torch.randn(prediction.shape, generator=generator)).pow(2).mean()
    loss.backward()
    optimizer.step()
    peft_model.eval()
    after = _base_weights(peft_model.base_model.model)
    adapter_changed = any(
        not torch.equal(adapter_before[n], p) for n, p in peft_model.named_parameters() if p.requires_grad
    )
    with torch.no_grad():
        trained_output = output_tensor(peft_model(**model_inputs))

    peft_model.save_pretrained(root / "adapter")
    config_targets = json.loads((root / "adapter" / "adapter_config.json").read_text())["target_modules"]
    reloaded = PeftModel.from_pretrained(build(entry), root / "adapter").eval()
    with torch.no_grad():
        reloaded_output = output_tensor(reloaded(**model_inputs))
        reloaded.merge_adapter()
        merged_output = output_tensor(reloaded(**model_inputs))

    export_adapter(peft_model, root / "lora", "peft-lora", rank="full")
    lora = PeftModel.from_pretrained(build(entry), root / "lora").eval()
    lora_output, lora_problem = None, None
    try:
        with torch.no_grad():
            lora_output = output_tensor(lora(**model_inputs))
    except TypeError as error:  # AnimateDiff calls its motion modules' proj_in / proj_out as `layer(input=...)`
        lora_problem = str(error)
    changed_layers = {
        name.removeprefix("base_model.model.")
        for name, module in peft_model.named_modules()
        if isinstance(module, BaseTunerLayer) and bool(module.get_sparse_update("default").values.any())
    }
    lora_error = convert_to_lora(peft_model, rank="full").total_error
    component = "unet" if "UNet" in entry.class_name else "transformer"  # the pipeline component it is
    export_adapter(peft_model, root / "kohya.safetensors", "kohya", rank=4, component=component)
    kohya_keys = set(load_file(root / "kohya.safetensors"))
    return ZooRun(
        peft_model=peft_model,
        block_layers=must,
        adapted=adapted,
        loss=float(loss),
        base_unchanged=before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before),
        adapter_changed=adapter_changed,
        trained_output=trained_output,
        reloaded_output=reloaded_output,
        merged_output=merged_output,
        config_targets=config_targets,
        lora_output=lora_output,
        lora_problem=lora_problem,
        changed_layers=changed_layers,
        lora_error=float(lora_error),
        kohya_keys=kohya_keys,
    )


@pytest.fixture(scope="module", params=ZOO, ids=[entry.class_name for entry in ZOO])
def zoo_run(request, tmp_path_factory) -> ZooRun:
    return _run(request.param, tmp_path_factory.mktemp(request.param.class_name))


def test_defaults_adapt_attention_and_feed_forward_of_every_block(zoo_run):
    assert zoo_run.block_layers, "no repeated blocks found"
    for block, layers in zoo_run.block_layers.items():
        missing = [name for name in layers if name not in zoo_run.adapted]
        assert not missing, f"{block}: the defaults leave {missing} frozen"
    assert any(zoo_run.block_layers.values()), "no attention or feed-forward layer found in any block"


def test_one_training_step_changes_only_the_adapter(zoo_run):
    assert torch.isfinite(torch.tensor(zoo_run.loss))
    assert zoo_run.base_unchanged
    assert zoo_run.adapter_changed


def test_saved_config_lists_the_targets_and_reload_gives_identical_outputs(zoo_run):
    assert isinstance(zoo_run.config_targets, list) and zoo_run.config_targets
    assert not torch.equal(zoo_run.trained_output, torch.zeros_like(zoo_run.trained_output))
    assert torch.equal(zoo_run.reloaded_output, zoo_run.trained_output)


def test_merge_gives_the_unmerged_output(zoo_run):
    torch.testing.assert_close(zoo_run.merged_output, zoo_run.trained_output, rtol=1e-4, atol=1e-5)


def test_full_rank_lora_export_reproduces_the_adapter(zoo_run):
    assert zoo_run.lora_error < 1e-4
    if zoo_run.lora_problem is not None:
        assert "missing 1 required positional argument" in zoo_run.lora_problem
        pytest.xfail("PEFT's LoRA layers cannot be called as `layer(input=...)`, as AnimateDiff's motion modules are")
    torch.testing.assert_close(zoo_run.lora_output, zoo_run.trained_output, rtol=1e-3, atol=1e-4)


def test_kohya_export_names_every_adapted_layer(zoo_run):
    downs = {key.removesuffix(".lora_down.weight") for key in zoo_run.kohya_keys if key.endswith(".lora_down.weight")}
    expected = {"lora_unet_" + name.replace(".", "_") for name in zoo_run.changed_layers} | {
        "lora_transformer_" + name.replace(".", "_") for name in zoo_run.changed_layers
    }
    assert zoo_run.changed_layers and downs and downs <= expected
    assert len(downs) == len(zoo_run.changed_layers)


def test_flux_single_blocks_adapt_proj_out_and_proj_mlp():
    """The issue's example: FLUX.1's single-block `proj_out` (about 15% of FLUX.1-dev's weights) was never adapted."""
    entry = next(entry for entry in ZOO if entry.class_name == "FluxTransformer2DModel")
    report = coverage(build(entry))
    assert report.left_out == (
        "single_transformer_blocks.N.norm.linear",
        "transformer_blocks.N.norm1.linear",
        "transformer_blocks.N.norm1_context.linear",
    )
    assert report.adapted_layers == report.block_layers - 3


def _text_encoders() -> dict[str, object]:
    import transformers as hf

    decoder = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        head_dim=8,
    )
    clip = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    t5 = dict(vocab_size=100, d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8)
    return {  # the text encoders of SD / SDXL / SD3 / Flux / Wan / Z-Image / Sana, Lumina 2 / HiDream / Flux 2
        "CLIPTextModel": lambda: hf.CLIPTextModel(hf.CLIPTextConfig(**clip, bos_token_id=0, eos_token_id=1)),
        "CLIPTextModelWithProjection": lambda: hf.CLIPTextModelWithProjection(
            hf.CLIPTextConfig(**clip, bos_token_id=0, eos_token_id=1)
        ),
        "T5EncoderModel": lambda: hf.T5EncoderModel(hf.T5Config(**t5, feed_forward_proj="gated-gelu")),
        "UMT5EncoderModel": lambda: hf.UMT5EncoderModel(hf.UMT5Config(**t5)),
        "Qwen3Model": lambda: hf.Qwen3Model(hf.Qwen3Config(**decoder)),
        "Gemma2Model": lambda: hf.Gemma2Model(hf.Gemma2Config(**decoder)),
        "LlamaForCausalLM": lambda: hf.LlamaForCausalLM(hf.LlamaConfig(**decoder)),
        "MistralModel": lambda: hf.MistralModel(hf.MistralConfig(**decoder)),
    }


@pytest.mark.parametrize("class_name", list(_text_encoders()))
def test_text_encoder_defaults_adapt_every_layer_and_nothing_outside(class_name):
    torch.manual_seed(0)
    model = _text_encoders()[class_name]().eval()
    layer_lists = [name for name, module in model.named_modules() if isinstance(module, nn.ModuleList)]
    blocks = [name for name in layer_lists if name.endswith(("layers", "block"))]
    linears = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    in_blocks = {name for name in linears if name.startswith(tuple(f"{block}." for block in blocks))}
    peft_model = get_peft_model(model, SaRAConfig(trainable_fraction=0.05, init_weights=False))
    adapted = {
        name.removeprefix("base_model.model.")
        for name, module in peft_model.named_modules()
        if isinstance(module, BaseTunerLayer)
    }
    assert adapted == in_blocks  # q / k / v / o and the MLP of every layer; no head, projection or embedding
    ids = torch.tensor([[0, 5, 7, 1]])
    out = peft_model(input_ids=ids)
    with peft_model.disable_adapter():
        assert not torch.equal(peft_model(input_ids=ids)[0], out[0])


def test_vision_language_text_encoder_keeps_its_vision_tower_frozen():
    import transformers as hf

    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=100)
    config = hf.Qwen2_5_VLConfig(
        text_config=dict(text, num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32),
    )
    model = hf.Qwen2_5_VLForConditionalGeneration(config)
    peft_model = get_peft_model(model, SaRAConfig(trainable_fraction=0.05))
    adapted = [name for name, module in peft_model.named_modules() if isinstance(module, BaseTunerLayer)]
    assert len(adapted) == 2 * 7 and all(".language_model.layers." in name for name in adapted)


def test_coverage_reports_the_share_of_block_weights_adapted():
    entry = next(entry for entry in ZOO if entry.class_name == "SD3Transformer2DModel")
    model = build(entry)
    before = coverage(model)
    assert str(before).startswith(f"adapts {before.adapted_layers} of {before.block_layers} Linear/Conv weights")
    peft_model = get_peft_model(model, SaRAConfig(trainable_fraction=0.05, target_modules=["to_q", "to_k"]))
    explicit = coverage(peft_model)
    q = model.transformer_blocks[0].attn.to_q.base_layer.weight.numel()
    modulation = sum(
        module.weight.numel() for name, module in model.named_modules() if re.search(r"norm1(_context)?\.linear$", name)
    )
    assert (explicit.adapted_layers, explicit.block_layers) == (8, before.block_layers)
    assert explicit.adapted_parameters == 8 * q and before.block_parameters - before.adapted_parameters == modulation
    assert coverage(model, ["conv_in_does_not_exist"]).adapted_layers == 0
    assert coverage(model, SaRAConfig(target_modules=["to_q", "to_k"])) == explicit
    excluding = SaRAConfig(exclude_modules=["to_q"])  # the defaults, less every to_q
    assert coverage(model, excluding).adapted_layers == before.adapted_layers - 4


def test_a_model_without_repeated_blocks_still_needs_explicit_targets(mlp_conv):
    with pytest.raises(ValueError, match="no repeated blocks"):
        get_peft_model(mlp_conv, SaRAConfig())


def test_analyze_command_reports_what_the_default_targets_cover(tmp_path, capsys):
    from peft_sara import cli

    entry = next(entry for entry in ZOO if entry.class_name == "FluxTransformer2DModel")
    model = build(entry)
    model.save_pretrained(tmp_path / "transformer")
    assert cli.main(["analyze", str(tmp_path / "transformer"), "--no-histogram", "--quiet"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("SaRA's default targets"))
    assert line.endswith(str(coverage(model))) and "adapts 17 of 20 Linear/Conv weights" in line


# The UNet defaults before the structural rule, as adapters saved then record them in adapter_config.json.
PREVIOUS_UNET_DEFAULTS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "time_emb_proj",
]


def test_explicit_target_lists_and_adapters_saved_with_them_load_as_before(tmp_path):
    entry = next(entry for entry in ZOO if entry.class_name == "UNet2DConditionModel")
    config = SaRAConfig(trainable_fraction=0.05, target_modules=PREVIOUS_UNET_DEFAULTS, init_weights=False)
    peft_model = get_peft_model(build(entry), config).eval()
    expected = {
        name
        for name, module in build(entry).named_modules()
        if any(name == target or name.endswith(f".{target}") for target in PREVIOUS_UNET_DEFAULTS)
    }
    wrapped = {
        name.removeprefix("base_model.model.")
        for name, module in peft_model.named_modules()
        if isinstance(module, BaseTunerLayer)
    }
    assert wrapped == expected and not any("samplers" in name for name in wrapped)
    peft_model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    assert sorted(saved) == sorted(PREVIOUS_UNET_DEFAULTS)
    reloaded = PeftModel.from_pretrained(build(entry), tmp_path).eval()
    assert {n for n, m in reloaded.named_modules() if isinstance(m, BaseTunerLayer)} == {
        n for n, m in peft_model.named_modules() if isinstance(m, BaseTunerLayer)
    }
    with torch.no_grad():
        assert torch.equal(output_tensor(reloaded(**inputs(entry))), output_tensor(peft_model(**inputs(entry))))
