"""``--wire_dtype``: what states travel in, both directions, for every method, counted in the bytes."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import ArrayRecord

from smartfed.fl.wire import decode, encode, wire_bytes
from smartfed.run.config import RunConfig

from .conftest import run_in_process, tiny_run_config


@pytest.mark.parametrize("wire", ["float32", "bfloat16", "float16"])
def test_encode_survives_flower_and_decodes_to_float32(wire):
    state = {"r.weight": torch.randn(5, 7, generator=torch.Generator().manual_seed(0)), "steps": torch.arange(3)}
    record = ArrayRecord(torch_state_dict=encode(state, wire))  # through Flower's numpy-backed arrays
    back = decode(record.to_torch_state_dict(), wire)
    assert back["r.weight"].dtype == torch.float32
    expected = state["r.weight"].to(getattr(torch, wire)).float()
    assert torch.equal(back["r.weight"], expected)  # exactly the wire dtype's rounding, nothing else
    assert torch.equal(back["steps"], state["steps"])  # integers pass untouched
    size = {"float32": 4, "bfloat16": 2, "float16": 2}[wire]
    assert wire_bytes(state, wire) == 35 * size + 3 * 8
    assert sum(len(a.data) for a in record.values()) >= wire_bytes(state, wire)  # on the wire: data + framing


def test_a_tensor_of_another_dtype_is_left_for_validation_to_name():
    sent = {"r.weight": torch.randn(2, 2, dtype=torch.float64)}
    assert decode(sent, "float16")["r.weight"].dtype == torch.float64  # not silently cast: validation drops it


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["smartfed", "fedit"])
def test_a_run_in_bfloat16_sends_half_the_bytes_and_trains(run_assets, tmp_path, method):
    runs = {}
    for wire in ("float32", "bfloat16"):
        out = tmp_path / wire
        run_in_process(tiny_run_config(run_assets, out, method, wire_dtype=wire, topk_experts=4))
        runs[wire] = _rows(out)
    for r32, r16 in zip(runs["float32"], runs["bfloat16"], strict=True):
        assert r16["wire_dtype"] == "bfloat16"
        assert r16["bytes_up_state"] * 2 == r32["bytes_up_state"] > 0
        assert r16["bytes_down"] * 2 == r32["bytes_down"] > 0
        assert r16["train_loss"] == pytest.approx(r32["train_loss"], rel=0.05)  # rounding, not another run
    summary = json.loads((tmp_path / "bfloat16" / "summary.json").read_text())
    assert summary["bytes_total"] == summary["bytes_up_total"] + summary["bytes_down_total"]
    assert summary["wire_dtype"] == "bfloat16"
    # the server keeps float32: the checkpoint is float32 whatever travelled
    from safetensors.torch import load_file

    checkpoint = load_file(tmp_path / "bfloat16" / "checkpoints" / "round_0002.safetensors")
    assert all(v.dtype == torch.float32 for v in checkpoint.values() if v.is_floating_point())


def test_wire_dtype_is_checked():
    with pytest.raises(ValueError, match=r"wire_dtype='int8' is not one of"):
        RunConfig(wire_dtype="int8")
    with pytest.raises(ValueError, match=r"secagg=True sends quantised integers: wire_dtype='bfloat16'"):
        RunConfig(secagg=True, sample_clients=2, wire_dtype="bfloat16")
