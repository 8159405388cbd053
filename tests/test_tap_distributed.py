"""`tap-train` on two CPU ranks (gloo, through `accelerate launch`) takes the same steps as one process: DDP and
DeepSpeed ZeRO-2, each compared on the loss curve and the exported weights, and a killed ZeRO-2 run resumes."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import load_file

from finetune.tap.config import TapTrainConfig
from finetune.tap.trainer import TapTrainer

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "finetune" / "configs" / "tap_world_stage1.yaml"
ACCELERATE = ROOT / "finetune" / "configs" / "accelerate"
STEPS = 4


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from finetune.tap.world import make_world
    folder = tmp_path_factory.mktemp("world")
    make_world(folder, train=16, eval=2, seed=2, dim=64)
    return folder


def overrides(world: Path, out: Path) -> list[str]:
    # two ranks of micro-batch 2 share each global batch of 4 images; no dropout, so ranks draw nothing apart
    return [f"data.sa1b={world / 'train'}", f"data.priors={world / 'priors'}", f"output_dir={out}",
            f"max_steps={STEPS}", "global_batch=4", "micro_batch=2", "save_every=2", "report_to=[]",
            "sampler.prompts_per_image=4", "model.text_dropout=0.0",
            "model.overrides={image_size: 128, window_size: 8, sem_embed_dim: 64, image_embed_dim: 64, "
            "decoder_mlp_dim: 128}"]


@pytest.fixture(scope="module")
def one_process(world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one")
    TapTrainer(TapTrainConfig.load(CONFIG, overrides(world, out))).train()
    return out


def launch(world: Path, out: Path, mode: str, *extra: str) -> list[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    how = ["--multi_gpu"] if mode == "ddp" else ["--config_file", str(ACCELERATE / f"{mode}.yaml")]
    return [sys.executable, "-m", "accelerate.commands.launch", *how, "--num_processes", "2", "--mixed_precision",
            "no", "--main_process_port", str(port), "-m", "finetune", "tap-train", str(CONFIG),
            *overrides(world, out), *extra]


def run(cmd: list[str], kind: str) -> None:
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"processes: 2 ({kind})" in done.stdout and done.stdout.count(f"done: {STEPS} steps") == 1, done.stdout


def same_run(a: Path, b: Path, curve: Callable[[Path], dict[int, float]]) -> None:
    """Runs `a` and `b` took the same steps: equal loss curves (`curve` reads one) and equal exported weights."""
    ca, cb = curve(a), curve(b)
    assert sorted(ca) == sorted(cb) == list(range(1, STEPS + 1))
    assert all(ca[s] == pytest.approx(cb[s], rel=1e-5) for s in ca), (ca, cb)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    params = [k for k in wa if "running_" not in k and "num_batches" not in k]
    bad = [k for k in params if (wa[k].float() - wb[k].float()).abs().max() >= 1e-4]
    assert sorted(wa) == sorted(wb) and not bad, bad


@pytest.mark.parametrize("mode", ["ddp", "zero2"])
def test_two_ranks_take_the_same_steps_as_one(mode: str, world, one_process, tmp_path: Path, loss_curve) -> None:
    run(launch(world, tmp_path, mode), "MULTI_CPU" if mode == "ddp" else "DEEPSPEED")
    same_run(one_process, tmp_path, loss_curve)


def test_a_killed_zero2_run_resumes_on_the_same_loss_curve(world, one_process, tmp_path: Path, kill_at_checkpoint,
                                                           loss_curve) -> None:
    kill_at_checkpoint(launch(world, tmp_path, "zero2"), tmp_path, 2)
    run(launch(world, tmp_path, "zero2", "--resume"), "DEEPSPEED")
    same_run(one_process, tmp_path, loss_curve)
