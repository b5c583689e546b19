"""A refused operation changes nothing: model (every tensor bitwise, ``requires_grad``, module types), configs, adapter
names, active and merged adapters; the optimizer keeps its state keyed by the same parameter objects."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_unet
from peft import PeftModel, get_peft_model
from torch import nn

import peft_sara
from peft_sara.hotswap import enable_sara_hotswap
from peft_sara.merging import combine_adapters
from peft_sara.pipelines import inject_sara_adapter
from peft_sara.training import TRAINING_STATE_NAME, add_sara_adapter, load_training_state, save_training_state
from peft_sara.training.checkpoint import read_training_state, write_training_state
from peft_sara.tuner.layer import sara_layers


class ThreeLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return self.c(self.b(self.a(x)))


def _copy(tensor: torch.Tensor):
    if type(tensor) in (torch.Tensor, nn.Parameter):
        return tensor.detach().clone()
    return (id(tensor), tensor.dequantize().clone() if hasattr(tensor, "dequantize") else None)  # quantized storage


def snapshot(model: nn.Module) -> dict:
    """Everything a refusal must leave as it was."""
    named = list(model.named_parameters()) + list(model.named_buffers())
    return {
        "tensors": {name: _copy(tensor) for name, tensor in named},
        "requires_grad": {name: tensor.requires_grad for name, tensor in named},
        "modules": [(name, type(module).__name__) for name, module in model.named_modules()],
        "configs": {name: config.to_dict() for name, config in (getattr(model, "peft_config", None) or {}).items()},
        "layers": {
            name: (list(layer.active_adapters), list(layer.merged_adapters), dict(layer.sara_scaling))
            for name, layer in sara_layers(model)
        },
        "attributes": {key for key in vars(model)},
    }


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))
    )


def assert_unchanged(model: nn.Module, before: dict, ignore_attributes: set[str] = frozenset()) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["configs"] == before["configs"]
    assert after["layers"] == before["layers"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["attributes"] - ignore_attributes == before["attributes"] - ignore_attributes
    assert after["tensors"].keys() == before["tensors"].keys()
    for name, tensor in before["tensors"].items():
        if isinstance(tensor, tuple):  # a quantized weight: the same object, the same values
            assert after["tensors"][name][0] == tensor[0], name
            assert tensor[1] is None or bitwise_equal(after["tensors"][name][1], tensor[1]), name
        else:
            assert bitwise_equal(after["tensors"][name], tensor), name


def sara_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = peft_sara.SaRAConfig(target_modules=["a", "b", "c"], trainable_fraction=0.5, init_weights=False)
    return get_peft_model(ThreeLayers(), config)


def third_layer_fp8(model: nn.Module) -> None:
    """Give the third SaRA layer float8 storage, which cannot take a merged weight."""
    layer = dict(sara_layers(model))["base_model.model.c"]
    base = layer.get_base_layer()
    base.weight = nn.Parameter(base.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)


# ------------------------------------------------------------------------------------------------- merges
@pytest.mark.parametrize("operation", ["merge_adapter", "safe_merge_adapter", "merge_and_unload", "fuse_lora"])
def test_a_merge_refused_in_the_third_layer_merges_nothing(operation):
    if operation == "fuse_lora":
        model = tiny_unet()
        model.add_adapter(peft_sara.SaRAConfig(target_modules=["to_q", "to_k", "to_v"], init_weights=False))
        layer = [layer for _, layer in sara_layers(model)][2]
        base = layer.get_base_layer()
        base.weight = nn.Parameter(base.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)
    else:
        model = sara_model()
        third_layer_fp8(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match="float8.*Nothing was merged"):
        if operation == "merge_adapter":
            model.merge_adapter()
        elif operation == "safe_merge_adapter":
            model.merge_adapter(safe_merge=True)
        elif operation == "merge_and_unload":
            model.merge_and_unload()
        else:
            model.fuse_lora()
    # diffusers' fuse_lora records its arguments on the model before merging (its bookkeeping, not an adapter change)
    assert_unchanged(model, before, ignore_attributes={"lora_scale", "_safe_fusing"})
    if operation == "merge_and_unload":
        assert isinstance(model, PeftModel)
        assert len(list(sara_layers(model))) == 3  # still wrapped


def test_a_safe_merge_refused_for_a_broken_third_layer_merges_nothing():
    model = sara_model()
    layer = dict(sara_layers(model))["base_model.model.c"]
    with torch.no_grad():
        layer.sara_values["default"][0] = float("nan")
    before = snapshot(model)
    with pytest.raises(ValueError, match="NaNs or infs.*Nothing was merged"):
        model.merge_and_unload(safe_merge=True)
    assert_unchanged(model, before)
    model.merge_adapter(adapter_names=["default"])  # the unsafe merge still works and unmerges bitwise
    model.unmerge_adapter()
    assert_unchanged(model, before)


def _quantized_third_layer(storage: str) -> nn.Module:
    """ThreeLayers (256 wide: whole GGUF K-quant blocks) whose third layer is stored by torchao int8 or GGUF Q4_K."""
    torch.manual_seed(0)
    model = ThreeLayers()
    for name in ("a", "b", "c"):
        setattr(model, name, nn.Linear(256, 256))
    if storage == "torchao-int8":
        quantization = pytest.importorskip("torchao.quantization")
        quantization.quantize_(model.c, quantization.Int8WeightOnlyConfig())
    else:
        gguf = pytest.importorskip("gguf")
        gguf_utils = pytest.importorskip("diffusers.quantizers.gguf.utils")
        quant_type = gguf.GGMLQuantizationType.Q4_K
        block_size, type_size = gguf.GGML_QUANT_SIZES[quant_type]
        layer = gguf_utils.GGUFLinear(256, 256, bias=True, compute_dtype=torch.float32)
        packed = torch.randint(0, 255, (256, 256 // block_size * type_size), dtype=torch.uint8)
        layer.weight = gguf_utils.GGUFParameter(packed, quant_type=quant_type)
        layer.bias = nn.Parameter(model.c.bias.detach().clone(), requires_grad=False)
        model.c = layer
    config = peft_sara.SaRAConfig(target_modules=["a", "b", "c"], trainable_fraction=0.01, init_weights=False)
    return get_peft_model(model, config)


@pytest.mark.parametrize("storage", ["torchao-int8", "gguf-Q4_K"])
@pytest.mark.parametrize("operation", ["merge_adapter", "merge_and_unload"])
def test_a_merge_refused_by_quantized_storage_in_the_third_layer_merges_nothing(storage, operation):
    model = _quantized_third_layer(storage)
    before = snapshot(model)
    with pytest.raises(ValueError, match="Nothing was merged"):
        getattr(model, operation)()
    assert_unchanged(model, before)


# ------------------------------------------------------------------------------------------------- injection
BAD_CONFIGS = {
    "unsupported module": dict(target_modules=["a", "norm"]),
    "no match": dict(target_modules=["zzz"]),
}
REFUSED = (TypeError, ValueError)  # SaRA's "cannot adapt LayerNorm", PEFT's NoMatchingPeftModuleError
REFUSAL_MESSAGE = "cannot adapt|not found"


@pytest.mark.parametrize("bad", sorted(BAD_CONFIGS))
def test_a_refused_add_adapter_leaves_no_name_and_a_retry_works(bad):
    model = sara_model()
    before = snapshot(model)
    with pytest.raises(REFUSED, match=REFUSAL_MESSAGE):
        model.add_adapter("extra", peft_sara.SaRAConfig(**BAD_CONFIGS[bad]))
    assert_unchanged(model, before)
    model.add_adapter("extra", peft_sara.SaRAConfig(target_modules=["a"], trainable_fraction=0.5))
    assert "extra" in model.peft_config


@pytest.mark.parametrize("bad", sorted(BAD_CONFIGS))
@pytest.mark.parametrize("entry", ["get_peft_model", "inject_sara_adapter", "add_sara_adapter"])
def test_refused_injection_entry_points_leave_the_model_unchanged(entry, bad):
    torch.manual_seed(0)
    model = ThreeLayers()
    before = snapshot(model)
    config = peft_sara.SaRAConfig(**BAD_CONFIGS[bad])
    with pytest.raises(REFUSED, match=REFUSAL_MESSAGE):
        if entry == "get_peft_model":
            get_peft_model(model, config)
        elif entry == "inject_sara_adapter":
            inject_sara_adapter(model, config, "x")
        else:
            add_sara_adapter(model, config, "x")
    assert_unchanged(model, before)


def test_a_refused_add_sara_adapter_on_a_diffusers_model_leaves_it_unchanged():
    unet = tiny_unet()
    before = snapshot(unet)
    with pytest.raises(TypeError, match="cannot adapt"):
        add_sara_adapter(unet, peft_sara.SaRAConfig(target_modules=["to_q", "norm1"]))
    assert_unchanged(unet, before)
    add_sara_adapter(unet, peft_sara.SaRAConfig(target_modules=["to_q"]))  # a retry works
    assert list(unet.peft_config) == ["default"]


class TwoComponents:
    def __init__(self, **components):
        self.components = components


def test_a_refused_enable_sara_hotswap_leaves_every_component_unchanged():
    torch.manual_seed(0)
    first, second = ThreeLayers(), ThreeLayers()
    second.a = nn.LayerNorm(8)  # the second component refuses: its `a` is not adaptable
    pipe = TwoComponents(unet=first, text_encoder=second)
    before = [snapshot(first), snapshot(second)]
    with pytest.raises(TypeError, match="cannot adapt"):
        enable_sara_hotswap(pipe, 0.2, target_modules=["a"], components=["unet", "text_encoder"])
    assert_unchanged(first, before[0])
    assert_unchanged(second, before[1])


def test_a_refused_combine_adapters_leaves_the_model_unchanged():
    model = sara_model()
    model.add_adapter("other", peft_sara.SaRAConfig(target_modules=["a", "b", "c"], trainable_fraction=0.5))
    before = snapshot(model)
    with pytest.raises(ValueError):
        combine_adapters(model, ["default", "other"], [1.0], "mix")  # one weight for two adapters
    with pytest.raises(ValueError, match="already exists"):
        combine_adapters(model, ["default", "other"], [0.5, 0.5], "other")
    assert_unchanged(model, before)


# ------------------------------------------------------------------------------------------------- resume
def test_a_resume_refused_inside_its_transaction_keeps_the_optimizer_state_of_the_same_parameters(tmp_path):
    """A re-signed state whose moment has the wrong shape is refused after the adapter was loaded: the model comes
    back bitwise and the optimizer keeps its Adam moments, keyed by the very same Parameter objects."""
    model = sara_model()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3)
    for _ in range(2):
        model(torch.randn(2, 8)).square().sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    save_training_state(str(tmp_path), model, optimizer, scheduler)
    path = tmp_path / TRAINING_STATE_NAME
    state = read_training_state(path)
    first = next(iter(state["optimizer"]["state"].values()))
    first["exp_avg"] = torch.zeros(first["exp_avg"].numel() + 1)
    write_training_state(state, path)  # re-signed: the checksum matches

    for _ in range(1):  # move on, so that the checkpoint differs from the live state
        model(torch.randn(2, 8)).square().sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    before = snapshot(model)
    moments = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for p in params}
    scheduler_state = copy.deepcopy(scheduler.state_dict())
    with pytest.raises(ValueError):
        load_training_state(str(tmp_path), model, optimizer, scheduler)
    assert_unchanged(model, before)
    assert scheduler.state_dict() == scheduler_state
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == [id(p) for p in params]
    assert {id(p) for p in optimizer.state} == {id(p) for p in params}  # the same objects, not copies
    for param in params:
        for key, value in moments[id(param)].items():
            assert torch.equal(optimizer.state[param][key], value), key


# ------------------------------------------------------------------------------------------------- states that load can train
def _resumable(tmp_path):
    from peft_sara.training import SaRATrainingHelper

    model = sara_model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
    helper = SaRATrainingHelper(model, optimizer, total_steps=10)
    for _ in range(2):
        model(torch.randn(2, 8)).square().sum().backward()
        optimizer.step()
        scheduler.step()
        helper.step()
        optimizer.zero_grad()
    save_training_state(str(tmp_path), model, optimizer, scheduler, helper)
    return model, optimizer, scheduler, helper


RESIGNED_EDITS = {
    "T_max 0": ("lr_scheduler", lambda state: state.update(T_max=0), "trial step"),
    "a step key": ("lr_scheduler", lambda state: state.update(step=3), "has keys"),
    "global_step a string": ("helper", lambda state: state.update(global_step="7"), "global_step"),
    "reselected not a bool": ("helper", lambda state: state.update(reselected="no"), "reselected"),
    "negative step": ("helper", lambda state: state.update(global_step=-1), "global_step"),
}


@pytest.mark.parametrize("edit", sorted(RESIGNED_EDITS))
def test_re_signed_scheduler_and_helper_states_that_could_not_train_are_refused(tmp_path, edit):
    """States that load must train: re-signed (checksum recomputed) edits that would crash or silently skip at the
    first resumed step are refused before anything changes."""
    model, optimizer, scheduler, helper = _resumable(tmp_path)
    part, change, message = RESIGNED_EDITS[edit]
    path = tmp_path / TRAINING_STATE_NAME
    state = read_training_state(path)
    change(state[part])
    write_training_state(state, path)
    before = snapshot(model)
    moments = {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
    scheduler_state, helper_state = copy.deepcopy(scheduler.state_dict()), copy.deepcopy(helper.state_dict())
    with pytest.raises(ValueError, match=message):
        load_training_state(str(tmp_path), model, optimizer, scheduler, helper)
    assert_unchanged(model, before)
    assert scheduler.state_dict() == scheduler_state and "step" not in vars(scheduler)
    assert helper.state_dict().keys() == helper_state.keys()
    assert helper.global_step == helper_state["global_step"] and helper.reselected == helper_state["reselected"]
    for param, saved in optimizer.state.items():
        assert all(torch.equal(saved[k], v) for k, v in moments[id(param)].items())


# ------------------------------------------------------------------------------------------------- the CLI
def _folder_bytes(folder) -> dict:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def recorded_base(tmp_path_factory):
    """A tiny saved pipeline and an adapter that records it as its base (no --base needed to export)."""
    import tiny_pipelines
    from diffusers import StableDiffusionPipeline

    root = tmp_path_factory.mktemp("cli-base")
    pipeline_dir = tiny_pipelines.build_sd_pipeline(root)
    pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir, safety_checker=None, requires_safety_checker=False)
    tiny_pipelines.add_random_sara_adapter(pipe, "style")
    adapter_dir = peft_sara.save_sara_adapter(pipe, root / "adapter", base_model=str(pipeline_dir))
    return root, pipeline_dir, adapter_dir


@pytest.mark.parametrize("explicit_base", [False, True])
def test_the_cli_never_writes_into_the_base_it_reads_implicitly(recorded_base, capsys, explicit_base):
    """`export A --format diff -o BASE/unet/diffusion_pytorch_model.safetensors` is refused whether BASE was named with
    --base or read from the adapter's record, before anything is written."""
    from peft_sara import cli

    root, pipeline_dir, adapter_dir = recorded_base
    before = _folder_bytes(root)
    argv = [
        "export",
        str(adapter_dir),
        "--format",
        "diff",
        "-o",
        str(pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors"),
    ]
    if explicit_base:
        argv += ["--base", str(pipeline_dir)]
    capsys.readouterr()
    status = cli.main(argv)
    err = capsys.readouterr().err
    assert status == 2 and "would destroy the input" in err and "Traceback" not in err
    assert _folder_bytes(root) == before


def test_the_cli_never_writes_into_the_hub_cache(recorded_base, capsys, monkeypatch, tmp_path):
    import huggingface_hub.constants

    from peft_sara import cli

    _, _, adapter_dir = recorded_base
    cache = tmp_path / "hub"
    (cache / "models--org--adapter" / "snapshots" / "abc").mkdir(parents=True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    output = cache / "models--org--adapter" / "snapshots" / "abc" / "lora.safetensors"
    capsys.readouterr()
    status = cli.main(["export", str(adapter_dir), "--format", "kohya", "-o", str(output)])
    assert status == 2 and "Hub cache" in capsys.readouterr().err
    assert not output.exists()
