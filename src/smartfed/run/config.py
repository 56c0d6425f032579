"""Every knob of a federated run, one dataclass (the flags of the reference SmartFed CLI).

The same object is the CLI's flags, the ``--config`` TOML/YAML file, the
``[tool.flwr.app.config]`` run config of ``flwr run`` (keys with hyphens), and
the run folder's ``config.json``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

import tomllib

from ..models import DEVICE_FORMS, DtypeName, is_device_spec
from ..more.config import GateType, RankInput, RouterDtype, RouterInit, RouterType

Partition = Literal["iid", "dirichlet"]
EnergyMode = Literal["codecarbon", "none"]
Aggregation = Literal["mean", "median", "trimmed_mean"]
OnInsufficient = Literal["retry", "skip", "fail"]
DpMode = Literal["none", "server", "client"]
Importance = Literal["prob_contribution", "contribution", "gated_contribution"]
WireDtype = Literal["float32", "bfloat16", "float16"]


def _choice(name: str, value: object, choices_type: object) -> None:
    if value not in get_args(choices_type):
        raise ValueError(f"{name}={value!r} is not one of {list(get_args(choices_type))}")


@dataclass
class RunConfig:
    """A federated run; defaults follow the paper's protocol scaled to small machines."""

    model_name_or_path: str = field(default="", metadata={"help": "transformers model id or local folder (required)."})
    lora_pool: str = field(default="", metadata={"help": "Comma-separated PEFT adapter folders or Hub ids (required)."})
    task: str = field(default="arith", metadata={"help": "Registered task name or a local Alpaca-style JSONL file."})
    method: str = field(default="smartfed", metadata={"help": "Registered method (see `smartfed methods`)."})
    num_clients: int = field(default=20, metadata={"help": "Number of clients (data partitions)."})
    sample_clients: int = field(default=2, metadata={"help": "Clients sampled per round."})
    num_rounds: int = field(default=20, metadata={"help": "Communication rounds."})
    local_steps: int = field(default=10, metadata={"help": "Local optimiser steps per client per round."})
    batch_size: int = field(default=16, metadata={"help": "Local batch size."})
    learning_rate: float = field(default=5e-4, metadata={"help": "AdamW learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    topk_experts: int = field(default=32, metadata={"help": "Experts kept per token per matrix (K)."})
    router: RouterType = field(
        default="rank",
        metadata={
            "help": "MoRE router: 'rank' (W_r (M, M) on the experts' own A x: < 0.1 % of the model, the paper's "
            "light router) or 'linear' (W_r (M, d_in) on the layer input, as large as a LoRA's A)."
        },
    )
    gate: GateType = field(default="scaled_softmax", metadata={"help": "MoRE gate function."})
    rank_input: RankInput = field(
        default="matched",
        metadata={
            "help": "Rank router input: 'matched' (A x scaled per token to the L1 mass of x, so it learns as fast "
            "as the linear router at one learning rate) or 'raw' (A x)."
        },
    )
    router_init: RouterInit = field(
        default="normal",
        metadata={
            "help": "Router start: 'normal' (seeded, std --router_init_std: every token ranks the experts "
            "differently) or 'zeros' (all logits equal: top-K keeps the last experts of the pool for every token)."
        },
    )
    router_init_std: float = field(default=0.02, metadata={"help": "Std of the 'normal' router start."})
    router_bias: bool = field(default=True, metadata={"help": "Give each router a per-expert bias."})
    lora_rank: int = field(default=16, metadata={"help": "Rank of LoRAs trained from scratch (fedit, flora, ...)."})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA alpha of LoRAs trained from scratch."})
    lora_target_modules: str = field(
        default="q_proj,v_proj", metadata={"help": "Comma-separated module names a from-scratch LoRA targets."}
    )
    method_options: str = field(
        default="", metadata={"help": "Method-specific options 'key=value,...' (see `smartfed methods`)."}
    )
    enable_eeqa: bool = field(default=False, metadata={"help": "Re-allocate quotas across matrices with EEQA."})
    eeqa_period: int = field(default=1, metadata={"help": "Run EEQA every this many rounds."})
    eeqa_k_min: int = field(default=1, metadata={"help": "Smallest quota of a matrix under EEQA."})
    eeqa_k_max: int = field(default=0, metadata={"help": "Largest quota of a matrix under EEQA (0: its expert count)."})
    eeqa_importance: Importance = field(
        default="prob_contribution",
        metadata={
            "help": "Expert importance EEQA allocates by, with c_m = ‖s_m B_m A_m x‖/‖W0 x‖: 'prob_contribution' "
            "(router softmax over all experts × c_m), 'contribution' (c_m alone), 'gated_contribution' "
            "(kept gate × c_m: zero for dropped experts, so it feeds on its own quota)."
        },
    )
    client_budgets: str = field(
        default="", metadata={"help": "Comma-separated budgets β∈(0,1], cycled over clients ('' = all 1)."}
    )
    partition: Partition = field(default="iid", metadata={"help": "Data partition: 'iid' or 'dirichlet'."})
    alpha: float = field(default=0.5, metadata={"help": "Dirichlet concentration (partition=dirichlet)."})
    num_train: int = field(default=512, metadata={"help": "Training examples over all clients."})
    num_test: int = field(default=64, metadata={"help": "Held-out examples evaluated by the server each round."})
    max_length: int = field(default=128, metadata={"help": "Token length of a training example."})
    max_new_tokens: int = field(default=16, metadata={"help": "Tokens generated per evaluation answer."})
    eval_every: int = field(
        default=1, metadata={"help": "Evaluate on the held-out set every this many rounds (and at the end)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of data, partitions, sampling and local batches."})
    energy: EnergyMode = field(default="codecarbon", metadata={"help": "Energy estimate: 'codecarbon' or 'none'."})
    client_threads: int = field(
        default=0,
        metadata={"help": "torch threads per client (0: leave torch's default; Ray gives each simulated client 1)."},
    )
    # --- device, precision, memory (README "GPUs, 16-bit and 4-bit bases") ---------------------
    device: str = field(
        default="auto",
        metadata={
            "help": "Where models load and train: 'auto' (CUDA when present, else the CPU), 'cpu', 'cuda', "
            "'cuda:N'. A SuperNode's node config 'device' overrides it for that node."
        },
    )
    dtype: DtypeName = field(
        default="auto",
        metadata={
            "help": "dtype of the base model: 'auto' (bfloat16 on a GPU that has it, float16 on an older GPU, "
            "float32 on the CPU), 'float32', 'bfloat16', 'float16'. Routers and LoRA factors stay float32."
        },
    )
    load_in_4bit: bool = field(
        default=False, metadata={"help": "Quantise the base to 4-bit NF4 with bitsandbytes (smartfed[gpu])."}
    )
    load_in_8bit: bool = field(
        default=False, metadata={"help": "Quantise the base to 8-bit (LLM.int8) with bitsandbytes (smartfed[gpu])."}
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in the backward pass: less memory, ~30 % more time."}
    )
    router_dtype: RouterDtype = field(
        default="float32",
        metadata={"help": "dtype of SmartFed's trainable routers (float32 keeps them stable under a 16-bit base)."},
    )
    client_gpus: float = field(
        default=0.0,
        metadata={
            "help": "GPUs per simulated client (Ray num_gpus; 0.25: four clients share a GPU; 0: Ray reserves none)."
        },
    )
    client_cpus: int | None = field(
        default=None,
        metadata={"help": "CPU cores per simulated client (Ray num_cpus; default: --client_threads, at least 1)."},
    )
    output_dir: str = field(default="runs/smartfed", metadata={"help": "Run folder."})
    wire_dtype: WireDtype = field(
        default="float32",
        metadata={
            "help": "dtype the states travel in, both directions, for every method (counted in the bytes); "
            "the server keeps and averages float32."
        },
    )
    # --- faults, robust aggregation, privacy (docs/reliability.md) -------------------------
    min_fit_clients: int = field(
        default=1, metadata={"help": "Valid client replies a round needs to aggregate (else --on_insufficient)."}
    )
    on_insufficient: OnInsufficient = field(
        default="retry",
        metadata={
            "help": "Too few valid replies: 'retry' (re-sample, --round_retries times, then skip), 'skip', 'fail'."
        },
    )
    round_retries: int = field(default=2, metadata={"help": "Re-samplings of a round with too few valid replies."})
    round_timeout: float = field(
        default=3600.0, metadata={"help": "Seconds the server waits for a round's replies; later ones are dropped."}
    )
    max_update_norm: float = field(
        default=1e4, metadata={"help": "Drop a reply whose L2 distance to the global state exceeds this (0: off)."}
    )
    aggregation: Aggregation = field(
        default="mean", metadata={"help": "Combine rule: 'mean' (FedAvg), 'median' or 'trimmed_mean' (robust)."}
    )
    trim_fraction: float = field(
        default=0.1, metadata={"help": "Fraction cut at each end per coordinate by aggregation=trimmed_mean."}
    )
    clip_update_norm: float = field(
        default=0.0, metadata={"help": "Clip each client's delta from the global state to this L2 norm (0: off)."}
    )
    dp: DpMode = field(
        default="none",
        metadata={"help": "Central DP on the state (Flower's fixed-clipping wrappers): 'none', 'server' or 'client'."},
    )
    dp_noise_multiplier: float = field(default=1.0, metadata={"help": "DP: Gaussian noise σ / clipping norm."})
    dp_clipping_norm: float = field(default=1.0, metadata={"help": "DP: L2 bound of each client's state delta."})
    dp_delta: float = field(default=1e-5, metadata={"help": "DP: δ at which the run's ε is reported."})
    secagg: bool = field(
        default=False, metadata={"help": "Secure aggregation with Flower's SecAgg+: the server sees only the sum."}
    )
    secagg_clipping_range: float = field(
        default=8.0, metadata={"help": "SecAgg+: values are clipped to ±this before quantisation."}
    )

    def __post_init__(self) -> None:
        positive = (
            "num_clients",
            "sample_clients",
            "num_rounds",
            "local_steps",
            "batch_size",
            "topk_experts",
            "eeqa_period",
            "eeqa_k_min",
            "num_train",
            "num_test",
            "max_length",
            "max_new_tokens",
            "eval_every",
            "lora_rank",
        )
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if isinstance(self.client_threads, bool) or not isinstance(self.client_threads, int) or self.client_threads < 0:
            raise ValueError(f"client_threads={self.client_threads!r} must be an integer >= 0")
        if self.sample_clients > self.num_clients:
            raise ValueError(f"sample_clients={self.sample_clients!r} exceeds num_clients={self.num_clients!r}")
        if self.max_length < 2:  # encode_examples keeps one prompt token and at least one answer token
            raise ValueError(
                f"max_length={self.max_length!r} leaves no room for the answer: a training example needs one "
                "prompt token and at least one answer token (--max_length >= 2)"
            )
        # a rate of inf or NaN turns the first step's weights into NaN: every reply is then dropped
        if not 0 < self.learning_rate < math.inf:
            raise ValueError(f"learning_rate={self.learning_rate!r} must be a finite number > 0")
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"weight_decay={self.weight_decay!r} must be a finite number >= 0")
        if self.eeqa_k_max < 0:
            raise ValueError(f"eeqa_k_max={self.eeqa_k_max!r} must be >= 0")
        if not 0 < self.lora_alpha < math.inf:
            raise ValueError(f"lora_alpha={self.lora_alpha!r} must be a finite number > 0")
        if not [m for m in self.lora_target_modules.split(",") if m.strip()]:
            raise ValueError(f"lora_target_modules={self.lora_target_modules!r} names no module")
        if not 0 < self.alpha < math.inf:
            raise ValueError(f"alpha={self.alpha!r} must be a finite number > 0")
        _choice("router", self.router, RouterType)
        _choice("gate", self.gate, GateType)
        _choice("router_init", self.router_init, RouterInit)
        _choice("rank_input", self.rank_input, RankInput)
        if not 0 < self.router_init_std < float("inf"):
            raise ValueError(f"router_init_std={self.router_init_std!r} must be a finite number > 0")
        _choice("eeqa_importance", self.eeqa_importance, Importance)
        _choice("wire_dtype", self.wire_dtype, WireDtype)
        _choice("partition", self.partition, Partition)
        _choice("energy", self.energy, EnergyMode)
        self.budget_values()  # validates client_budgets (without a list of num_clients entries)
        self._check_device()
        self._check_reliability()

    def _check_device(self) -> None:
        """The form of the device, precision and resource settings (whether this machine has them: at load)."""
        if not is_device_spec(self.device):
            raise ValueError(f"device={self.device!r} is not a device: use {DEVICE_FORMS}")
        _choice("dtype", self.dtype, DtypeName)
        _choice("router_dtype", self.router_dtype, RouterDtype)
        for name in ("load_in_4bit", "load_in_8bit", "gradient_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be true or false")
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("load_in_4bit=True and load_in_8bit=True exclude each other: choose one quantisation")
        gpus = self.client_gpus
        if isinstance(gpus, bool) or not isinstance(gpus, (int, float)) or not 0 <= gpus < math.inf:
            raise ValueError(f"client_gpus={gpus!r} must be a finite number >= 0")
        if gpus > 1 and gpus != int(gpus):  # Ray: a fraction of one GPU, or whole GPUs
            raise ValueError(f"client_gpus={gpus!r}: above 1 it must be a whole number of GPUs")
        if gpus > 0 and self.device == "cpu":
            raise ValueError(f"client_gpus={gpus!r} with device='cpu': a client on the CPU needs no GPU")
        cpus = self.client_cpus
        if cpus is not None and (isinstance(cpus, bool) or not isinstance(cpus, int) or cpus < 1):
            raise ValueError(f"client_cpus={cpus!r} must be a positive integer (or unset: --client_threads)")

    def ray_client_cpus(self) -> int:
        """Ray's num_cpus per simulated client: ``client_cpus``, else ``client_threads`` (at least 1)."""
        return self.client_cpus if self.client_cpus is not None else max(self.client_threads, 1)

    def _check_reliability(self) -> None:
        for name in ("min_fit_clients", "round_retries"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "min_fit_clients" else 0):
                raise ValueError(f"{name}={value!r} must be an integer >= {1 if name == 'min_fit_clients' else 0}")
        if self.min_fit_clients > self.sample_clients:
            raise ValueError(f"min_fit_clients={self.min_fit_clients!r} exceeds sample_clients={self.sample_clients!r}")
        if not 0 < self.round_timeout < float("inf"):
            raise ValueError(f"round_timeout={self.round_timeout!r} must be a positive number of seconds")
        for name in ("max_update_norm", "clip_update_norm"):
            if not 0 <= getattr(self, name) < float("inf"):
                raise ValueError(f"{name}={getattr(self, name)!r} must be a finite number >= 0 (0: off)")
        if not 0 <= self.trim_fraction < 0.5:
            raise ValueError(f"trim_fraction={self.trim_fraction!r} must be in [0, 0.5)")
        if not 0 <= self.dp_noise_multiplier < float("inf"):
            raise ValueError(f"dp_noise_multiplier={self.dp_noise_multiplier!r} must be a finite number >= 0")
        if not 0 < self.dp_clipping_norm < float("inf"):
            raise ValueError(f"dp_clipping_norm={self.dp_clipping_norm!r} must be a finite number > 0")
        if not 0 < self.dp_delta < 1:
            raise ValueError(f"dp_delta={self.dp_delta!r} must be in (0, 1)")
        _choice("on_insufficient", self.on_insufficient, OnInsufficient)
        _choice("aggregation", self.aggregation, Aggregation)
        _choice("dp", self.dp, DpMode)
        if not 0 < self.secagg_clipping_range < float("inf"):
            raise ValueError(f"secagg_clipping_range={self.secagg_clipping_range!r} must be a finite number > 0")
        if self.secagg and (self.dp != "none" or self.aggregation != "mean" or self.clip_update_norm > 0):
            # the server only ever sees the masked sum: nothing per client to clip, rank or noise-calibrate
            raise ValueError(
                f"secagg=True needs dp='none', aggregation='mean' and clip_update_norm=0 "
                f"(got dp={self.dp!r}, aggregation={self.aggregation!r}, clip_update_norm={self.clip_update_norm!r})"
            )
        if self.secagg and self.wire_dtype != "float32":
            # SecAgg+ sends its own quantised integers, not the state's floats
            raise ValueError(f"secagg=True sends quantised integers: wire_dtype={self.wire_dtype!r} must be 'float32'")
        if self.secagg and self.sample_clients < 2:
            raise ValueError(f"secagg=True needs sample_clients >= 2 (got {self.sample_clients!r})")
        if self.dp != "none" and (self.aggregation != "mean" or self.clip_update_norm > 0):
            # the Gaussian mechanism's noise is calibrated to the clipped mean's sensitivity
            raise ValueError(
                f"dp={self.dp!r} needs aggregation='mean' and clip_update_norm=0 "
                f"(got aggregation={self.aggregation!r}, clip_update_norm={self.clip_update_norm!r})"
            )

    def budget_values(self) -> list[float]:
        """The β values of ``--client_budgets`` as given (``[1.0]`` when empty), validated."""
        if not self.client_budgets.strip():
            return [1.0]
        try:
            values = [float(b) for b in self.client_budgets.split(",")]
        except ValueError:
            raise ValueError(f"client_budgets={self.client_budgets!r} must be comma-separated numbers") from None
        if not all(0 < b <= 1 for b in values):
            raise ValueError(f"client_budgets={self.client_budgets!r}: every β must be in (0, 1]")
        return values

    def budgets(self) -> list[float]:
        """β per client id (the values cycled over ``num_clients``)."""
        values = self.budget_values()
        return [values[i % len(values)] for i in range(self.num_clients)]

    # --- (de)serialisation ---------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> RunConfig:
        known = {f.name: f for f in fields(cls)}
        odd = [k for k in data if not isinstance(k, str)]
        if odd:  # e.g. YAML's `? ` or `1: x` give None or int keys
            raise ValueError(f"{source}: keys must be option names, got {odd[0]!r}")
        data = {k.replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {unknown}")
        for key, value in data.items():  # TOML/YAML/Flower give us loosely typed values
            default = known[key].default
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise ValueError(f"{source}: {key}={value!r} must be true or false")
            elif isinstance(default, int):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ValueError(f"{source}: {key}={value!r} must be an integer")
            elif isinstance(default, float):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"{source}: {key}={value!r} must be a number")
                data[key] = float(value)
            elif isinstance(default, str) and not isinstance(value, str):
                raise ValueError(f"{source}: {key}={value!r} must be a string")
        return cls(**data)

    def to_flower(self) -> dict[str, Any]:
        """Flower run config (hyphenated keys, scalar values; an unset ``None`` field is left out: its default)."""
        return {k.replace("_", "-"): v for k, v in self.to_dict().items() if v is not None}

    @classmethod
    def from_flower(cls, run_config: dict[str, Any]) -> RunConfig:
        return cls.from_dict(dict(run_config), source="Flower run config")

    @classmethod
    def from_file(cls, path: str | Path) -> dict[str, Any]:
        """Read a TOML, YAML or JSON file of the same keys (returned raw, to merge with flags)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
            if path.suffix == ".toml":
                data = tomllib.loads(text)
            elif path.suffix in (".yaml", ".yml"):
                import yaml

                try:
                    data = yaml.safe_load(text)
                except yaml.YAMLError as err:  # not a ValueError: re-raise as one, with the file named below
                    raise ValueError(" ".join(str(err).split())) from err
            elif path.suffix == ".json":
                data = json.loads(text)
            else:
                raise ValueError("expected a .toml, .yaml/.yml or .json file")
        except (UnicodeDecodeError, ValueError) as err:
            raise ValueError(f"config file {path}: {err}") from err
        if not isinstance(data, dict):
            raise ValueError(f"config file {path}: expected a table of keys")
        return data
