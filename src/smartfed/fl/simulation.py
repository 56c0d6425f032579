"""Run a federation on Flower's simulation engine (one machine, N virtual clients)."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from ..run.config import RunConfig
from ..run.folder import RunFolder
from .client_app import make_client_app
from .server_app import make_server_app


def check_gpus(config: RunConfig) -> None:
    """Refuse ``--client_gpus`` on a machine without CUDA: Ray would wait forever for a GPU to place a client on."""
    if config.client_gpus > 0:
        import torch

        if not torch.cuda.is_available():
            raise ValueError(
                f"--client_gpus {config.client_gpus:g}: this machine has no CUDA GPU for Ray to give the clients "
                "(leave --client_gpus at 0 on the CPU)"
            )


def _backend_config(config: RunConfig, *, verbose: bool) -> dict[str, Any]:
    """Ray's resources and start arguments for Flower's simulation engine (this run's temp dir added later).

    Each simulated client is a Ray actor holding its own copy of the base model: ``client_gpus``
    (a fraction of a GPU) and ``client_cpus`` set how many actors Ray runs at once.
    """
    check_gpus(config)
    return {
        "client_resources": {"num_cpus": config.ray_client_cpus(), "num_gpus": float(config.client_gpus)},
        "init_args": {
            "num_cpus": os.cpu_count() or 1,
            "include_dashboard": False,
            "logging_level": "error",
            "log_to_driver": verbose,
            # Ray's servers bind to the node address: loopback keeps them off every other interface
            "_node_ip_address": "127.0.0.1",
        },
    }


def run_simulation(
    config: RunConfig, *, resume: bool = False, progress: bool = True, verbose: bool = False, overwrite: bool = False
) -> None:
    """Simulate ``config.num_clients`` clients with Flower; writes ``config.output_dir``.

    A fresh run needs an empty (or new) folder; ``overwrite=True`` first deletes a previous
    SmartFed run there (and refuses any other folder); ``resume=True`` continues the folder's
    run with the same settings. The folder is locked for the whole simulation. Raises the
    ServerApp's exception itself (``RunFailed`` when the run trained nothing).
    """
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    # Ray resolves a node address of 127.0.0.1 to the machine's outward address unless clusters are off
    # (read when ray is first imported): with them off, its servers bind loopback only.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if not verbose:  # Ray workers inherit the environment: quiet them too
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from flwr.simulation import run_simulation as flwr_run_simulation

    if not verbose:
        from transformers.utils import logging as hf_logging

        logging.getLogger("flwr").setLevel(logging.ERROR)
        hf_logging.disable_progress_bar()
    backend_config = _backend_config(config, verbose=verbose)
    folder = RunFolder(Path(config.output_dir).expanduser().resolve())
    errors: list[BaseException] = []
    with (
        folder.open_run(config, resume=resume, overwrite=overwrite),  # refused before Flower starts
        # Ray's session folder (logs, sockets, spilled objects) is this run's, removed when it ends
        tempfile.TemporaryDirectory(prefix="smartfed-ray-", ignore_cleanup_errors=True) as ray_temp,
    ):
        backend_config["init_args"]["_temp_dir"] = ray_temp
        try:
            flwr_run_simulation(
                server_app=make_server_app(config, resume=resume, progress=progress, errors=errors),
                client_app=make_client_app(config),
                num_supernodes=config.num_clients,
                backend_config=backend_config,
                verbose_logging=verbose,
            )
        except Exception:
            if errors:  # the ServerApp's own error, not the engine's wrapper around it ("Ending simulation")
                raise errors[0]  # noqa: B904 (its own cause and traceback stay)
            raise
    if errors:  # an engine that only logs the ServerApp's error must not make the run look finished
        raise errors[0]
