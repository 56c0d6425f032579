"""End to end on Flower's deployment engine: a SuperLink and 2 SuperNodes on loopback, via scripts/deploy_local.sh."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from .conftest import save_tiny_assets

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "deploy_local.sh"
BIN = Path(sys.executable).parent  # the venv running pytest provides flower-superlink & co.
FLOWER_NAMES = ("flower-superlink", "flower-supernode", "flower-superexec", "flwr-serverapp", "flwr-clientapp", "flwr")
# ~105 s on an idle 2-core machine (each Flower message starts a fresh flwr-clientapp that imports torch)
RUN_TIMEOUT = 170  # the script gives up on the run (and cleans up) after this
TEST_TIMEOUT = 210  # we kill the script's process group after this
# the SuperNode-kill run waits up to --round-timeout (60 s) for the dead node, once or twice
KILL_RUN_TIMEOUT = 420


def _flower_superlink() -> str | None:
    local = BIN / "flower-superlink"
    return str(local) if local.exists() else shutil.which("flower-superlink")


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, str]:
    """A tiny Llama saved as a transformers folder (with a char tokenizer) and two PEFT adapters for it."""
    root = tmp_path_factory.mktemp("deploy-assets")
    model_dir, a, b = save_tiny_assets(root)
    return {"model": str(model_dir), "pool": f"{a},{b}"}


def _flower_cmdline(proc) -> str:
    """The command line of a flower-*/flwr* process ('' for any other)."""
    try:
        cmd = " ".join(proc.cmdline())
    except Exception:  # vanished meanwhile
        return ""
    words = cmd.split()[:2]  # console scripts run as `python /path/flower-superlink ...`
    return cmd if any(os.path.basename(w) in FLOWER_NAMES for w in words) else ""


def _alive(proc) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _tagged(tag: str) -> list:
    """Live processes whose environment carries the tag the script exports to all it starts."""
    import psutil

    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("SMARTFED_DEPLOY_TAG") == tag and _alive(proc):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


class _Watcher(threading.Thread):
    """Records every flower/flwr process below the script while it runs."""

    def __init__(self, root_pid: int) -> None:
        super().__init__(daemon=True)
        self.root_pid = root_pid
        self.seen: dict[tuple[int, float], tuple[object, str]] = {}  # (pid, start) -> (process, command line)
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        while not self.stop.is_set():
            try:
                for proc in psutil.Process(self.root_pid).children(recursive=True):
                    if cmd := _flower_cmdline(proc):
                        with contextlib.suppress(psutil.NoSuchProcess):
                            self.seen.setdefault((proc.pid, proc.create_time()), (proc, cmd))
            except psutil.NoSuchProcess:
                return
            self.stop.wait(0.5)


def _kill_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=40)  # the script's EXIT trap stops what it started
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the script and the leak check need Linux /proc")
@pytest.mark.skipif(_flower_superlink() is None, reason="flower-superlink is not installed (pip install flwr)")
@pytest.mark.skipif(
    shutil.which("setsid") is None or shutil.which("timeout") is None,
    reason="the script needs setsid and timeout (util-linux, coreutils)",
)
def test_deployment_engine_on_loopback(assets, tmp_path):
    psutil = pytest.importorskip("psutil")
    out, logs = tmp_path / "run", tmp_path / "logs"
    tag = f"smartfed-test-{uuid.uuid4().hex}"
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "SMARTFED_VENV": str(BIN.parent),
        "SMARTFED_DEPLOY_TAG": tag,
        "SMARTFED_DEPLOY_TIMEOUT": str(RUN_TIMEOUT),
        "SMARTFED_STARTUP_TIMEOUT": "60",
        "SMARTFED_DEPLOY_LOGS": str(logs),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    overrides = (
        f'model-name-or-path="{assets["model"]}" lora-pool="{assets["pool"]}" task="arith" '
        "num-rounds=2 sample-clients=2 local-steps=2 batch-size=4 learning-rate=0.05 topk-experts=4 "
        "num-train=16 num-test=4 max-length=32 max-new-tokens=2 eval-every=2 seed=7 "
        f'energy="none" output-dir="{out}"'
    )
    started = time.monotonic()
    proc = subprocess.Popen(
        ["bash", str(SCRIPT), "2", "--", overrides],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    watcher = _Watcher(proc.pid)
    watcher.start()
    try:
        output, _ = proc.communicate(timeout=TEST_TIMEOUT)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        output, _ = proc.communicate()
        pytest.fail(f"deploy_local.sh did not finish in {TEST_TIMEOUT}s:\n{output[-4000:]}")
    finally:
        watcher.stop.set()
        watcher.join(timeout=5)
        if proc.poll() is None:
            _kill_group(proc)
    elapsed = time.monotonic() - started

    # nothing it started may outlive it (zombies awaiting init's reaping are not running)
    deadline = time.monotonic() + 10
    while (left := _tagged(tag) + [p for p, _ in watcher.seen.values() if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.5)
    left_desc = [f"{p.pid}: {_flower_cmdline(p) or '?'}"[:160] for p in left if _alive(p)]
    for p in (p for p in left if _alive(p)):  # don't leak into the rest of the session even when the assertion fails
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    assert not left_desc, f"processes left behind: {left_desc}"

    assert proc.returncode == 0, f"exit {proc.returncode} after {elapsed:.0f}s:\n{output[-4000:]}"
    seen = [cmd for _, cmd in watcher.seen.values()]
    assert sum("flower-superlink" in cmd for cmd in seen) == 1, seen
    assert sum("flower-supernode" in cmd for cmd in seen) == 2, seen
    assert str(logs) in output and (logs / "superlink.log").is_file() and (logs / "supernode-1.log").is_file()

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert row["clients_replied"] == 2 and row["clients"] == [0, 1]
    assert rows[-1]["eval_n"] == 4
    for r in (1, 2):
        assert (out / "checkpoints" / f"round_{r:04d}.safetensors").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["config"]["num_clients"] == 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the script and the kill need Linux /proc")
@pytest.mark.skipif(_flower_superlink() is None, reason="flower-superlink is not installed (pip install flwr)")
@pytest.mark.skipif(
    shutil.which("setsid") is None or shutil.which("timeout") is None,
    reason="the script needs setsid and timeout (util-linux, coreutils)",
)
def test_killing_a_supernode_mid_run_leaves_the_run_to_the_others(assets, tmp_path):
    """3 SuperNodes; SuperNode 2 is SIGKILLed once round 1 is checkpointed. Round 2 samples partitions [1, 2]
    (seed 7): partition 2 never answers, is dropped after --round-timeout (or as unavailable), and the run
    finishes with partition 1's update."""
    psutil = pytest.importorskip("psutil")
    out, logs = tmp_path / "run", tmp_path / "logs"
    tag = f"smartfed-test-{uuid.uuid4().hex}"
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "SMARTFED_VENV": str(BIN.parent),
        "SMARTFED_DEPLOY_TAG": tag,
        "SMARTFED_DEPLOY_TIMEOUT": str(KILL_RUN_TIMEOUT),
        "SMARTFED_STARTUP_TIMEOUT": "60",
        "SMARTFED_DEPLOY_LOGS": str(logs),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    overrides = (
        f'model-name-or-path="{assets["model"]}" lora-pool="{assets["pool"]}" task="arith" '
        "num-rounds=2 sample-clients=2 local-steps=2 batch-size=4 learning-rate=0.05 topk-experts=4 "
        "num-train=24 num-test=4 max-length=32 max-new-tokens=2 eval-every=2 seed=7 "
        f'min-fit-clients=1 round-timeout=60.0 energy="none" output-dir="{out}"'
    )
    proc = subprocess.Popen(
        ["bash", str(SCRIPT), "3", "--", overrides],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    killed = None
    try:
        deadline = time.monotonic() + TEST_TIMEOUT
        while not (out / "checkpoints" / "round_0001.safetensors").exists():
            if proc.poll() is not None:
                pytest.fail(f"deploy_local.sh ended before round 1 ({proc.returncode}):\n{proc.stdout.read()[-4000:]}")
            assert time.monotonic() < deadline, "round 1 never finished"
            time.sleep(0.2)
        for node in _tagged(tag):
            with contextlib.suppress(psutil.NoSuchProcess):
                if "flower-supernode" in _flower_cmdline(node) and "partition-id=2 " in _flower_cmdline(node):
                    node.kill()  # SIGKILL: no goodbye to the SuperLink
                    killed = node.pid
        assert killed is not None, "SuperNode 2 not found"
        output, _ = proc.communicate(timeout=KILL_RUN_TIMEOUT + 60)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        output, _ = proc.communicate()
        pytest.fail(f"deploy_local.sh did not finish:\n{output[-4000:]}")
    finally:
        if proc.poll() is None:
            _kill_group(proc)
    assert proc.returncode == 0, output[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[0]["clients"] == [0, 1] and rows[0]["clients_replied"] == 2
    assert rows[1]["clients"] == [1, 2] and rows[1]["clients_replied"] == 1 and not rows[1]["skipped"]
    assert [d["partition"] for d in rows[1]["dropped"]] == [2], rows[1]["dropped"]
    assert json.loads((out / "summary.json").read_text())["rounds"] == 2
