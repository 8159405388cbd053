"""Shared fixtures. The parity fixtures live outside the repo (../shared/reference); tests that need them skip
with a reason on a user's clone, and fail instead when TAP_REQUIRE_FIXTURES=1 (set by .ci/run)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference"
FIXTURE_A = REFERENCE / "tap-parity" / "A"
LLAMA_TOKENIZER = REFERENCE / "tap-parity" / "text_tokenizer.model"
DEMO = ROOT / "models" / "demo"  # the shipped demo models


# Never touch the network or the user's HF cache: an empty, offline cache. Set at import, before any test module
# imports huggingface_hub (it reads these once, and online-but-unreachable costs ~20 s of retries per file).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="tapchat-hf-home-")
# Likewise no demo bundle unless a test names one (TAPCHAT_DEMO_MODELS): what runs without weights must not depend
# on whether models/demo is built; tests of the bundle itself point at it.
os.environ["TAPCHAT_DEMO_MODELS"] = os.path.join(tempfile.gettempdir(), "tapchat-no-demo-models")
# `--dtype auto` on CPU picks what this CPU runs fastest (tokenizer_tap/cpu.py); tests compare exact outputs, so they
# pin it to float32 on every machine (tests/test_cpu.py lifts the pin to test the choice itself).
os.environ["TAPCHAT_AUTO_DTYPE"] = "float32"


def _need(path: Path) -> Path:
    if not path.exists():
        if os.environ.get("TAP_REQUIRE_FIXTURES") == "1":
            pytest.fail(f"{path} is required in CI (TAP_REQUIRE_FIXTURES=1) but missing")
        pytest.skip(f"{path} not present (parity fixtures ship beside the repo, not in it)")
    return path


@pytest.fixture(scope="session")
def reference():
    """`reference(path)`: a file from ../shared/reference, or skip (fail in CI) when it is absent."""
    return _need


@pytest.fixture
def bad_images(tmp_path: Path) -> list[tuple[Path, str]]:
    """Uploads a user can get wrong, each with the message it must produce: corrupt, not an image, too large."""
    import io

    from PIL import Image
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes((ROOT / "examples" / "scene.jpg").read_bytes()[:2000])
    text = tmp_path / "notes.png"
    text.write_text("this is text, not a picture")
    huge = tmp_path / "huge.png"
    buf = io.BytesIO()
    Image.new("1", (9000, 5000)).save(buf, format="PNG")  # 45 MP, tiny on disk
    huge.write_bytes(buf.getvalue())
    return [(corrupt, "corrupt|truncated"), (text, "not an image"), (huge, "too large")]


@pytest.fixture(scope="session")
def fixture_a() -> Path:
    return _need(FIXTURE_A / "expected.npz").parent


@pytest.fixture(scope="session")
def llama_tokenizer() -> Path:
    return _need(LLAMA_TOKENIZER)


@pytest.fixture
def slow_tokens(monkeypatch):
    """Make every chosen token take `seconds` (default 20 ms), so streaming and Stop can be watched. Patched where
    the app's answers choose their tokens: the continuous batcher."""
    import time

    import assistant.batching as batching
    real = batching.next_tokens

    def slow_down(seconds: float = 0.02) -> None:
        def slow(*args, **kwargs):
            time.sleep(seconds)
            return real(*args, **kwargs)
        monkeypatch.setattr(batching, "next_tokens", slow)
    return slow_down


@pytest.fixture(scope="session")
def tiny_predictor():
    from tokenizer_tap import TapPredictor
    return TapPredictor.random(device="cpu", dtype="float32")


@pytest.fixture
def photo() -> np.ndarray:
    """A 300x400 RGB test picture: gradient background with a bright square."""
    y, x = np.mgrid[0:300, 0:400]
    img = np.stack([x * 255 // 400, y * 255 // 300, np.full_like(x, 90)], -1).astype(np.uint8)
    img[100:200, 150:260] = (250, 240, 30)
    return img


@pytest.fixture(scope="session")
def cars_scene(tmp_path_factory) -> Path:
    """Held-out world scene 91 (seed 0) as a PNG: exactly 3 cars, all of which the demo TAP finds (test_find_chat)."""
    from PIL import Image

    from finetune.tap.world import render
    path = tmp_path_factory.mktemp("scenes") / "cars.png"
    Image.fromarray(render(0, "eval", 91).image).save(path)
    return path


os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


@pytest.fixture(scope="module")
def app_server(tmp_path_factory):
    """Start the app in-process with tiny models (`demo=True`: the shipped demo models, whose TAP knows what it
    sees): `start(auth=None, demo=False) -> (url, service)`; all closed after the module."""
    import socket

    from app.cli import build_app, launch
    from app.config import AppConfig
    from assistant.engine import Assistant
    from assistant.store import ChatStore

    started = []

    def start(auth: list[tuple[str, str]] | None = None, demo: bool = False):
        data = tmp_path_factory.mktemp("app")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        config = AppConfig(port=port, data_dir=data, auth=auth or [], tiny=not demo, everything_grid=6)
        store = ChatStore(config.db_path, config.image_dir)
        bot = Assistant.demo(store=store, device="cpu", folder=DEMO) if demo else Assistant.tiny(store=store)
        demo, service, _ = build_app(config, bot)
        _, url, _ = launch(demo, config, prevent_thread_lock=True, quiet=True)
        started.append((demo, service))
        return url.rstrip("/"), service

    yield start
    for demo, service in started:
        demo.close()
        service.bot.store.close()


# ------------------------------------------------------------------------------------- killed runs and resuming
# A run killed mid-way must resume onto the loss curve of a run that was never stopped. Training tests kill runs in
# one of two ways and compare curves, so each way lives here once.
def _loss_curve(folder: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


@pytest.fixture(scope="session")
def loss_curve() -> Callable[[Path], dict[int, float]]:
    """`loss_curve(folder)`: step -> loss from a run's metrics.jsonl, what a resumed run must reproduce."""
    return _loss_curve


@pytest.fixture
def interrupt_at_step(monkeypatch) -> Callable[[type, int, Callable[[], object]], None]:
    """`interrupt_at_step(trainer_class, step, train)`: call `train()` with the trainer's optimizer step raising
    KeyboardInterrupt once the trainer is at `step`, as Ctrl-C would stop it in-process; the real step is put back
    afterwards, so the run that resumes is unpatched."""

    def interrupt(trainer_class: type, step: int, train: Callable[[], object]) -> None:
        real = trainer_class._optimizer_step

        def crash(self, window):
            if self.step == step:
                raise KeyboardInterrupt("killed")
            return real(self, window)

        monkeypatch.setattr(trainer_class, "_optimizer_step", crash)
        with pytest.raises(KeyboardInterrupt):
            train()
        monkeypatch.setattr(trainer_class, "_optimizer_step", real)

    return interrupt


def _kill_at_checkpoint(cmd: list[str], out: Path, step: int) -> None:
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    marker = out / "checkpoints" / f"step-{step:07d}" / "progress.json"
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert marker.exists() and not (out / "config.json").exists(), "the run should die between checkpoint and end"


@pytest.fixture(scope="session")
def kill_at_checkpoint() -> Callable[[list[str], Path, int], None]:
    """`kill_at_checkpoint(cmd, out, step)`: start the training command `cmd` (writing to `out`) in its own process
    group and SIGKILL the whole group as soon as checkpoint `step` is complete, as a preempted job dies (every rank at
    once, no clean-up); asserts it died between that checkpoint and the end."""
    return _kill_at_checkpoint
