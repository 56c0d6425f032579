"""Device, dtype and memory options on the CPU: resolution rules, validation, simulation resources,
a 2-round federation over a bfloat16 base, and MoRE over a 4-bit bitsandbytes base.

The GPU side of the same options is checked by the ``gpu`` tests (scripts/gpu_check.sh).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import typer
from typer.testing import CliRunner

from smartfed import models
from smartfed.cli import app
from smartfed.data import char_tokenizer
from smartfed.fl.client_app import config_for_node, on_device
from smartfed.fl.simulation import _backend_config
from smartfed.models import load_model_and_tokenizer, place_on, resolve_device, resolve_dtype
from smartfed.run.config import RunConfig
from smartfed.run.folder import RunFolder

from .conftest import make_adapter, run_in_process, tiny_run_config

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a machine without CUDA")


# --- resolution rules -------------------------------------------------------------------------------
@no_cuda
def test_the_default_run_config_resolves_to_cpu_float32_here() -> None:
    """What keeps every committed CPU result bit for bit: the defaults change nothing on this machine."""
    config = RunConfig()
    device = resolve_device(config.device)
    assert device == torch.device("cpu")
    assert resolve_dtype(config.dtype, device) is torch.float32
    assert (config.load_in_4bit, config.load_in_8bit, config.gradient_checkpointing) == (False, False, False)
    assert config.router_dtype == "float32"


def test_auto_dtype_follows_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert resolve_dtype("auto", torch.device("cuda")) is torch.bfloat16  # Ampere and later
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert resolve_dtype("auto", torch.device("cuda:0")) is torch.float16  # Turing: no native bf16
    assert resolve_dtype("bfloat16", torch.device("cpu")) is torch.bfloat16  # an explicit dtype is kept


def test_auto_device_is_cuda_when_present(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match=r"--device 'cuda:2': this machine has 2 CUDA device\(s\)"):
        resolve_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")


@no_cuda
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_is_a_clear_error(spec: str) -> None:
    with pytest.raises(ValueError, match=rf"^--device '{spec}': this machine has no CUDA device"):
        resolve_device(spec)


@pytest.mark.parametrize("spec", ["gpu", "CUDA", "cuda:", "cuda:x", "cuda0", "", " cpu"])
def test_bad_devices_are_quoted(spec: str) -> None:
    with pytest.raises(ValueError, match=r"--device .* is not a device: use auto, cpu, cuda or cuda:N") as info:
        resolve_device(spec)
    assert repr(spec) in str(info.value)
    with pytest.raises(ValueError, match=r"device=.* is not a device"):
        RunConfig(device=spec)


@pytest.mark.parametrize("spec", ["fp16", "bf16", "float64", "half", "int8"])
def test_bad_dtypes_are_quoted(spec: str) -> None:
    with pytest.raises(ValueError, match=rf"--dtype '{spec}' is not one of \['auto', 'float32', 'bfloat16'"):
        resolve_dtype(spec, torch.device("cpu"))
    with pytest.raises(ValueError, match=rf"dtype='{spec}' is not one of"):
        RunConfig(dtype=spec)


# --- RunConfig validation ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"load_in_4bit": True, "load_in_8bit": True}, "load_in_4bit=True and load_in_8bit=True exclude each other"),
        ({"router_dtype": "float64"}, "router_dtype='float64' is not one of"),
        ({"client_gpus": -0.5}, "client_gpus=-0.5 must be a finite number >= 0"),
        ({"client_gpus": math.inf}, "client_gpus=inf must be a finite number >= 0"),
        ({"client_gpus": 1.5}, "client_gpus=1.5: above 1 it must be a whole number"),
        ({"client_gpus": 0.25, "device": "cpu"}, "client_gpus=0.25 with device='cpu'"),
        ({"client_cpus": 0}, "client_cpus=0 must be a positive integer"),
        ({"client_cpus": 1.5}, "client_cpus=1.5 must be a positive integer"),
        ({"load_in_4bit": "yes"}, "load_in_4bit='yes' must be true or false"),
    ],
)
def test_run_config_refuses_bad_device_settings(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        RunConfig(**overrides)


def test_run_config_accepts_the_documented_settings() -> None:
    config = RunConfig(device="cuda:1", dtype="bfloat16", load_in_4bit=True, client_gpus=0.25, client_cpus=2)
    assert (config.device, config.dtype, config.client_gpus, config.ray_client_cpus()) == (
        "cuda:1",
        "bfloat16",
        0.25,
        2,
    )
    assert RunConfig(client_gpus=2).client_gpus == 2


def test_quantisation_without_bitsandbytes_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None if name == "bitsandbytes" else real(name))
    with pytest.raises(ValueError, match=r"--load_in_4bit needs the bitsandbytes package.*smartfed\[gpu\]"):
        models.check_quantisation(True, False)
    with pytest.raises(ValueError, match=r"--load_in_8bit needs the bitsandbytes package"):
        load_model_and_tokenizer("/nonexistent/model", load_in_8bit=True)  # refused before any file is read
    models.check_quantisation(False, False)  # no quantisation: nothing needed


def test_an_old_run_folder_without_the_new_keys_loads_with_float32(tmp_path: Path) -> None:
    """A config.json written before --dtype existed: its run loaded float32, and a resume keeps it."""
    folder = tmp_path / "old"
    folder.mkdir()
    old = RunConfig(output_dir=str(folder)).to_dict()
    for key in ("device", "dtype", "load_in_4bit", "load_in_8bit", "gradient_checkpointing"):
        del old[key]
    for key in ("router_dtype", "client_gpus", "client_cpus"):
        del old[key]
    (folder / "config.json").write_text(json.dumps(old))
    raw = RunFolder(folder).read_config()
    config = RunConfig.from_dict(raw)
    assert (config.dtype, config.device, config.client_gpus, config.client_cpus) == ("float32", "auto", 0.0, None)
    # resumed with today's defaults ("auto" is float32 on the CPU) or on another device: the same run
    RunFolder(folder).check_resume(RunConfig(output_dir=str(folder)))
    RunFolder(folder).check_resume(RunConfig(output_dir=str(folder), device="cpu", client_cpus=2))
    with pytest.raises(ValueError, match=r"dtype: 'float32' -> 'bfloat16'"):
        RunFolder(folder).check_resume(RunConfig(output_dir=str(folder), dtype="bfloat16"))


def test_flower_run_config_leaves_unset_fields_out() -> None:
    flower = RunConfig().to_flower()
    assert "client-cpus" not in flower and flower["device"] == "auto" and flower["client-gpus"] == 0.0
    assert RunConfig.from_flower(flower) == RunConfig()
    assert RunConfig.from_flower({**flower, "client-cpus": 3}).client_cpus == 3


# --- resources of the simulation and of a SuperNode --------------------------------------------------
def test_simulation_resources_default_to_today() -> None:
    """No new flag given: each client still asks Ray for max(client_threads, 1) CPUs and no GPU."""
    for threads in (0, 1, 3):
        resources = _backend_config(RunConfig(client_threads=threads), verbose=False)["client_resources"]
        assert resources == {"num_cpus": max(threads, 1), "num_gpus": 0.0}


def test_simulation_resources_take_client_cpus_and_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    resources = _backend_config(RunConfig(client_threads=1, client_cpus=4), verbose=False)["client_resources"]
    assert resources == {"num_cpus": 4, "num_gpus": 0.0}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    resources = _backend_config(RunConfig(client_gpus=0.25, client_cpus=2), verbose=False)["client_resources"]
    assert resources == {"num_cpus": 2, "num_gpus": 0.25}


@no_cuda
def test_client_gpus_without_a_gpu_fails_before_ray() -> None:
    with pytest.raises(ValueError, match=r"--client_gpus 0.25: this machine has no CUDA GPU"):
        _backend_config(RunConfig(client_gpus=0.25), verbose=False)


def test_a_supernode_device_overrides_the_run_device() -> None:
    config = RunConfig(device="cpu")
    node = SimpleNamespace(node_config={"partition-id": 0, "device": "cuda:1"})
    assert config_for_node(node, config).device == "cuda:1"
    assert config_for_node(SimpleNamespace(node_config={"partition-id": 0}), config) is config
    with pytest.raises(ValueError, match=r"node config: device='gpu0'"):
        config_for_node(SimpleNamespace(node_config={"device": "gpu0"}), config)


def test_batches_follow_the_model_device() -> None:
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long)}
    (same,) = list(on_device([batch], torch.device("cpu")))
    assert same is batch  # nothing copied on the CPU
    (moved,) = list(on_device([batch], torch.device("meta")))
    assert moved["input_ids"].device.type == "meta" and moved["input_ids"].dtype is torch.long


def test_place_on_moves_what_is_elsewhere() -> None:
    layer = torch.nn.Linear(3, 2)
    layer.register_buffer("scale", torch.ones(2))
    layer.bias.requires_grad_(False)
    weight = layer.weight
    assert place_on(layer, torch.device("cpu")) is layer and layer.weight is weight  # already there: untouched
    place_on(layer, torch.device("meta"))
    assert {t.device.type for t in (layer.weight, layer.bias, layer.scale)} == {"meta"}
    assert layer.weight.requires_grad and not layer.bias.requires_grad


def test_the_commands_that_load_a_model_take_the_device_flags() -> None:
    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    flags = {name: {opt for p in commands[name].params for opt in p.opts} for name in commands}
    for name in ("run", "compare", "demo"):
        assert {"--device", "--dtype", "--load_in_4bit", "--load_in_8bit", "--gradient_checkpointing"} <= flags[name]
        assert "--client_gpus" in flags[name]
    for name in ("run", "compare"):
        assert {"--router_dtype", "--client_cpus"} <= flags[name]
    for name in ("eval", "generate", "export"):
        assert {"--device", "--dtype", "--load_in_4bit", "--load_in_8bit"} <= flags[name], name
    help_text = CliRunner().invoke(app, ["run", "--help"])
    assert help_text.exit_code == 0 and "--device" in help_text.output and "--client_gpus" in help_text.output


@no_cuda
def test_run_with_cuda_on_this_machine_is_one_error_line(run_assets, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["run", "--model_name_or_path", run_assets["model"], "--lora_pool", run_assets["pool"]]
    result = CliRunner().invoke(app, [*args, "--device", "cuda", "--output_dir", str(out)])
    assert result.exit_code == 2, result.output
    assert "--device 'cuda': this machine has no CUDA device" in result.output
    assert not out.exists()  # refused before the run folder is made


# --- loading and training in 16 bits on the CPU -----------------------------------------------------
def test_load_in_bfloat16_and_with_gradient_checkpointing(run_assets) -> None:
    model, _ = load_model_and_tokenizer(run_assets["model"], dtype="bfloat16", gradient_checkpointing=True)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.is_gradient_checkpointing and not model.config.use_cache
    default, _ = load_model_and_tokenizer(run_assets["model"])  # positional, as before: float32 on the CPU
    assert {p.dtype for p in default.parameters()} == {torch.float32}
    assert {p.device.type for p in default.parameters()} == {"cpu"} and not default.is_gradient_checkpointing


@pytest.mark.parametrize("method", ["smartfed", "fedit"])
def test_two_rounds_over_a_bfloat16_base(run_assets, tmp_path: Path, method: str) -> None:
    """A bf16 base on the CPU: the loss is finite and falls; the trained tensors (routers, LoRA factors) are float32."""
    from smartfed.fl.runtime import build_runtime

    config = tiny_run_config(
        run_assets,
        tmp_path / method,
        method,
        dtype="bfloat16",
        num_rounds=2,
        local_steps=4,
        learning_rate=5e-2,
        topk_experts=4,
        gradient_checkpointing=True,
    )
    run_in_process(config)
    rows = [json.loads(line) for line in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
    losses = [row["train_loss"] for row in rows]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses), losses
    assert losses[1] < losses[0], losses
    runtime = build_runtime(config)
    trained = [p for p in runtime.model.parameters() if p.requires_grad]
    assert trained and {p.dtype for p in trained} == {torch.float32}
    base = runtime.model.get_input_embeddings().weight
    assert base.dtype is torch.bfloat16 and not base.requires_grad
    if method == "smartfed":
        assert {name.rsplit(".", 2)[-2] for name, p in runtime.model.named_parameters() if p.requires_grad} == {
            "router"
        }
    saved = RunFolder(tmp_path / method).load_checkpoint(2)[0]
    assert saved and {v.dtype for v in saved.values()} == {torch.float32}  # the wire and checkpoints stay float32


def test_router_dtype_reaches_the_routers(run_assets, tmp_path: Path) -> None:
    from smartfed.fl.runtime import build_runtime

    config = tiny_run_config(
        run_assets, tmp_path / "r", "smartfed", dtype="bfloat16", router_dtype="bfloat16", topk_experts=4
    )
    routers = [p for p in build_runtime(config).model.parameters() if p.requires_grad]
    assert routers and {p.dtype for p in routers} == {torch.bfloat16}


# --- MoRE over a quantised base ----------------------------------------------------------------------
def _bitsandbytes_on_cpu() -> str | None:
    """Why a 4-bit base cannot be tested here, or None when it can."""
    if models.importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (pip install 'smartfed[gpu]')"
    return None


@pytest.fixture(scope="module")
def wide_assets(tmp_path_factory) -> dict[str, str]:
    """A tiny Llama of width 64 and two adapters: bitsandbytes' CPU 4-bit kernels need rows of 64 and more."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("wide")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(root / "model")
    char_tokenizer().save_pretrained(root / "model")
    pool = [make_adapter(model, root / name, r=4, alpha=8, seed=seed) for name, seed in (("a", 1), ("b", 2))]
    return {"model": str(root / "model"), "pool": ",".join(map(str, pool))}


@pytest.mark.skipif(_bitsandbytes_on_cpu() is not None, reason=str(_bitsandbytes_on_cpu()))
def test_more_over_a_4bit_base_trains_its_routers(wide_assets) -> None:
    """The generic path: a bnb Linear4bit base runs as a module, the routed part is one node; routers learn."""
    import bitsandbytes as bnb

    from smartfed.more import LoraPool, MoreConfig, attach_more

    base, _ = load_model_and_tokenizer(wide_assets["model"], dtype="bfloat16", load_in_4bit=True)
    assert isinstance(base.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    reference, _ = load_model_and_tokenizer(wide_assets["model"], dtype="bfloat16")
    pool = LoraPool.load(wide_assets["pool"].split(","))
    more = attach_more(base, pool, MoreConfig(top_k=4, router="rank"), generator=torch.Generator().manual_seed(0))
    layer = more.more_layers()["model.layers.0.self_attn.q_proj"]
    assert isinstance(layer.base_layer, bnb.nn.Linear4bit) and not layer._base_is_fusable(torch.zeros(1, 64))
    assert layer.lora_A.dtype is torch.float32 and layer.router.weight.dtype is torch.float32
    ids = torch.randint(3, 40, (2, 9), generator=torch.Generator().manual_seed(1))
    out = more(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss)
    # the experts' update rides on the 4-bit base: close to the same MoRE over the bf16 base, not equal to the bare base
    more_bf16 = attach_more(
        copy.deepcopy(reference), pool, MoreConfig(top_k=4, router="rank"), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        quantised_logits = more(input_ids=ids).logits.float()
        bf16_logits = more_bf16(input_ids=ids).logits.float()
        bare_logits = reference(input_ids=ids).logits.float()
    assert (quantised_logits - bf16_logits).abs().mean() < (bf16_logits - bare_logits).abs().mean()
    before = {n: p.detach().clone() for n, p in more.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(more.trainable_parameters(), lr=1e-2)
    out.loss.backward()
    optimizer.step()
    after = dict(more.named_parameters())
    assert all(not torch.equal(before[n], after[n]) for n in before)  # every router moved
    assert all(after[n].grad is not None and after[n].grad.dtype is torch.float32 for n in before)


@pytest.mark.skipif(_bitsandbytes_on_cpu() is not None, reason=str(_bitsandbytes_on_cpu()))
def test_fedit_over_an_8bit_base_trains_float32_lora(run_assets, tmp_path: Path) -> None:
    from smartfed.fl.runtime import build_runtime

    config = tiny_run_config(run_assets, tmp_path / "q8", "fedit", load_in_8bit=True)
    runtime = build_runtime(config)
    trained = [p for p in runtime.model.parameters() if p.requires_grad]
    assert trained and {p.dtype for p in trained} == {torch.float32}
    ids = torch.randint(3, 40, (2, 9), generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(runtime.model(input_ids=ids, labels=ids).loss)


def test_replace_keeps_validation() -> None:
    with pytest.raises(ValueError, match="device='tpu'"):
        replace(RunConfig(), device="tpu")
