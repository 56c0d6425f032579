"""Bad input gets a clear error naming the adapter, the file or the module."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from smartfed import LoraPool, MoreConfig, attach_more

from .conftest import make_adapter, tiny_llama


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_adapter"):
        LoraPool.load([tmp_path / "no_such_adapter"])


def test_missing_weights_file(two_adapters):
    (two_adapters[0] / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"'math'.*adapter_model\.safetensors"):
        LoraPool.load(two_adapters)


def test_pickle_only_adapter_is_refused(two_adapters):
    weights = two_adapters[0] / "adapter_model.safetensors"
    weights.rename(two_adapters[0] / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="convert it to safetensors"):
        LoraPool.load(two_adapters)


def test_missing_config(two_adapters):
    (two_adapters[1] / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"'json'.*adapter_config\.json"):
        LoraPool.load(two_adapters)


def test_corrupted_safetensors(two_adapters):
    weights = two_adapters[1] / "adapter_model.safetensors"
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + b"\x00" * 64)
    with pytest.raises(ValueError, match=r"'json'.*cannot read"):
        LoraPool.load(two_adapters)


def test_corrupted_config(two_adapters):
    (two_adapters[0] / "adapter_config.json").write_text("{ r: 4", encoding="utf-8")
    with pytest.raises(ValueError, match=r"'math'.*not valid JSON"):
        LoraPool.load(two_adapters)


def test_bad_rank_in_config(two_adapters):
    config_file = two_adapters[0] / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["r"] = -1
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"'math'.*'r'=-1"):
        LoraPool.load(two_adapters)


def _patch_config(adapter: Path, patch: dict) -> None:
    """Overwrite keys of one adapter's adapter_config.json."""
    config_file = adapter / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **patch}))


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"lora_alpha": float("inf")}, r"'math'.*'lora_alpha'=inf.*finite positive"),
        ({"lora_alpha": 1e40}, r"'math'.*scale lora_alpha / r = .*torch.float32 cannot hold"),  # hypothesis found it
        ({"alpha_pattern": {"q_proj": 1e300}}, r"'math'.*'model.layers.0.self_attn.q_proj'.*cannot hold"),
    ],
)
def test_alpha_too_large_for_the_dtype(two_adapters, patch, message):
    _patch_config(two_adapters[0], patch)
    with pytest.raises(ValueError, match=message):
        LoraPool.load(two_adapters)


def test_non_lora_adapter_refused(two_adapters):
    config_file = two_adapters[0] / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["peft_type"] = "IA3"
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="peft_type='IA3'"):
        LoraPool.load(two_adapters)


def test_foreign_tensor_refused(tmp_path):
    folder = make_adapter(tiny_llama(), tmp_path / "extra")
    save_file({"base_model.model.lm_head.weight": torch.zeros(64, 32)}, folder / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"'extra'.*lm_head\.weight"):
        LoraPool.load([folder])


def test_adapter_for_another_base_is_a_shape_mismatch(llama, tmp_path):
    wider = make_adapter(tiny_llama(hidden=48), tmp_path / "wide")
    with pytest.raises(ValueError, match=r"'wide'.*model\.layers\.0\.self_attn\.q_proj.*another base"):
        attach_more(llama(), LoraPool.load([wider]), MoreConfig(top_k=2))


def test_adapters_disagreeing_with_each_other(tmp_path):
    small = make_adapter(tiny_llama(), tmp_path / "small")
    wide = make_adapter(tiny_llama(hidden=48), tmp_path / "wide")
    with pytest.raises(
        ValueError, match=r"'small' and 'wide' disagree on module 'model\.layers\.0\.self_attn\.q_proj'"
    ):
        LoraPool.load([small, wide])


def test_unknown_module(llama, tmp_path):
    deeper = make_adapter(tiny_llama(layers=3), tmp_path / "deep")
    with pytest.raises(ValueError, match=r"'deep'.*model\.layers\.2\.self_attn\.q_proj.*does not have"):
        attach_more(llama(), LoraPool.load([deeper]), MoreConfig(top_k=2))


@pytest.mark.parametrize("top_k", [0, -1])
def test_top_k_below_one(top_k):
    with pytest.raises(ValueError, match=rf"MoreConfig\.top_k={top_k} must be >= 1"):
        MoreConfig(top_k=top_k)


def test_top_k_error_names_the_module(llama, two_adapters):
    with pytest.raises(ValueError, match=r"top_k=7 for module 'model\.layers\.0\.self_attn\.q_proj'.*\[1, 6\]"):
        attach_more(llama(), LoraPool.load(two_adapters), MoreConfig(top_k=7))


def test_set_quotas_validates(llama, two_adapters):
    more_model = attach_more(llama(), LoraPool.load(two_adapters), MoreConfig(top_k=2))
    before = more_model.quotas()
    name = next(iter(before))
    with pytest.raises(ValueError, match="unknown module"):
        more_model.set_quotas({"model.layers.9.self_attn.q_proj": 1})
    with pytest.raises(ValueError, match=rf"top_k=0 for module '{name}'"):
        more_model.set_quotas({name: 0})
    with pytest.raises(ValueError, match=r"top_k=99"):
        more_model.set_quotas({list(before)[1]: 1, name: 99})
    assert more_model.quotas() == before  # nothing half-applied


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("router", "mlp"),
        ("gate", "relu"),
        ("router_init", "ones"),
        ("router_dtype", "int8"),
        ("router_init_std", -1.0),
        ("top_k", 2.5),
        ("target_modules", "q_proj["),
    ],
)
def test_config_errors_quote_the_bad_value(field, value):
    with pytest.raises(ValueError, match=re.escape(f"MoreConfig.{field}={value!r}")):
        MoreConfig(**{field: value})


def test_config_round_trip_and_unknown_field():
    config = MoreConfig(top_k=3, router="rank", target_modules=["q_proj"])
    assert MoreConfig.from_dict(json.loads(config.to_json())) == config
    with pytest.raises(ValueError, match="unknown field"):
        MoreConfig.from_dict({"topk": 3})


def test_target_modules_selects_a_subset(llama, two_adapters):
    more_model = attach_more(llama(), LoraPool.load(two_adapters), MoreConfig(top_k=2, target_modules=["v_proj"]))
    assert all(n.endswith("v_proj") for n in more_model.more_layers())
    with pytest.raises(ValueError, match="selects none"):
        attach_more(llama(), LoraPool.load(two_adapters), MoreConfig(target_modules=["k_proj"]))


def test_load_router_refuses_other_experts(llama, two_adapters, tmp_path):
    pool = LoraPool.load(two_adapters)
    small = attach_more(llama(), LoraPool.load(two_adapters[:1]), MoreConfig(top_k=2))
    path = small.save_router(tmp_path / "router.safetensors")
    with pytest.raises(ValueError, match=r"router\.safetensors.*shape"):
        attach_more(llama(), pool, MoreConfig(top_k=2)).load_router(path)
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"bad\.safetensors.*not a readable"):
        small.load_router(tmp_path / "bad.safetensors")
    with pytest.raises(FileNotFoundError, match="nope"):
        small.load_router(tmp_path / "nope.safetensors")


# --- issue 15: values that cannot train are refused when the pool loads --------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_adapter_weights_name_the_file_and_tensor(two_adapters, bad):
    from safetensors.torch import load_file

    weights_file = two_adapters[1] / "adapter_model.safetensors"
    tensors = load_file(weights_file)
    key = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[key][0, 0] = bad
    save_file(tensors, weights_file)
    with pytest.raises(ValueError, match=rf"'json'.*{re.escape(key)}.*{re.escape(str(weights_file))}.*1 non-finite"):
        LoraPool.load(two_adapters)


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"alpha_pattern": {"q_proj": "big"}}, r"'math'.*alpha_pattern\['q_proj'\]='big'.*finite positive number"),
        ({"rank_pattern": {"v_proj": "4"}}, r"'math'.*rank_pattern\['v_proj'\]='4'.*positive integer"),
        ({"rank_pattern": {"v_proj": 2.5}}, r"'math'.*rank_pattern\['v_proj'\]=2\.5.*positive integer"),
        ({"alpha_pattern": ["q_proj"]}, r"'math'.*'alpha_pattern'.*JSON object"),
        ({"alpha_pattern": {"q_proj[": 8}}, r"'math'.*alpha_pattern key 'q_proj\['.*not a valid pattern"),
    ],
)
def test_bad_rank_or_alpha_pattern_names_the_key_and_value(two_adapters, patch, message):
    _patch_config(two_adapters[0], patch)
    with pytest.raises(ValueError, match=message):
        LoraPool.load(two_adapters)


def test_symlink_loop_is_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError("a local symlink must not be looked up on the Hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    monkeypatch.chdir(tmp_path)
    # "a/b" would pass for a Hub id: the loop sits at that relative path
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "adapter").symlink_to(tmp_path / "user" / "adapter")
    for source in (str(tmp_path / "loop"), "user/adapter"):
        with pytest.raises(FileNotFoundError, match=rf"{re.escape(source)}.*broken symlink or a symlink loop"):
            LoraPool.load([source])


def test_duplicate_adapter_in_the_pool_is_named(two_adapters, tmp_path):
    math_dir, json_dir = two_adapters
    with pytest.raises(ValueError, match=rf"{re.escape(str(math_dir))}' is given twice"):
        LoraPool.load([math_dir, json_dir, math_dir])
    (tmp_path / "alias").symlink_to(math_dir)  # the same folder under another name is the same adapter
    with pytest.raises(ValueError, match=r"given twice in the pool \(as .*math' and .*alias'\)"):
        LoraPool.load(f"{math_dir},{tmp_path / 'alias'}")
