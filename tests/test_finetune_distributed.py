"""Many processes: DDP and DeepSpeed ZeRO-2/3 (through `accelerate launch`, two CPU ranks on gloo) take the same
steps as one process, export the same checkpoint, and a killed ZeRO run resumes on the same loss curve."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import load_file

from finetune.config import TrainConfig
from finetune.synthetic import make
from finetune.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = ROOT / "finetune" / "configs" / "accelerate"
# No LoRA dropout: its masks depend on which rank draws them, and the point here is that the arithmetic agrees.
SETTINGS = ("max_steps=6", "save_every=3", "global_batch=8", "micro_batch=2", "report_to=[]", "trainable.llm=lora",
            "model.lora_r=4", "model.lora_alpha=8", "model.lora_dropout=0")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """20 image records and 8 text-only ones (Bunny has those), shuffled together by the trainer."""
    folder = tmp_path_factory.mktemp("shapes")
    make(folder, train_images=20, eval_images=2, seed=3)
    records = json.loads((folder / "train.json").read_text())
    records += [{"id": f"text-{a}", "conversations": [{"from": "human", "value": f"What is {a} plus 2?"},
                                                      {"from": "gpt", "value": str(a + 2)}]} for a in range(8)]
    (folder / "train.json").write_text(json.dumps(records))
    return folder


def overrides(shapes: Path, out: Path) -> list[str]:
    return [f"data.path={shapes / 'train.json'}", f"data.image_folder={shapes}", f"output_dir={out}", *SETTINGS]


@pytest.fixture(scope="module")
def one_process(shapes, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one")
    trainer = Trainer(TrainConfig.load(ROOT / "finetune" / "configs" / "tiny_shapes.yaml", overrides(shapes, out)))
    # Two ranks of micro-batch 2 split every 4 samples as [0, 2] and [1, 3]: some rank must get text only, so the
    # runs below cover a rank with no image while the other has one.
    order = trainer.epoch_order(0)
    text = [trainer.samples[i].image is None for i in order]
    assert any(text[i] and text[i + 2] for q in range(0, len(text) - 3, 4) for i in (q, q + 1))
    trainer.train()
    return out


def accelerate_config(mode: str, folder: Path) -> Path:
    """The shipped config; for ZeRO-3 with every weight sharded (DeepSpeed keeps small ones whole by default, and the
    tiny model's are all small), as Phi-2's and TAP's are."""
    shipped = ACCELERATE / f"{mode}.yaml"
    if mode != "zero3":
        return shipped
    ds = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
          "bf16": {"enabled": "auto"}, "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}
    (folder / "ds.json").write_text(json.dumps(ds))
    config = shipped.read_text().split("deepspeed_config:")[0] + (
        f"deepspeed_config:\n  deepspeed_config_file: {folder / 'ds.json'}\n  zero3_init_flag: false\n"
        "num_processes: 2\n")
    (folder / "accelerate.yaml").write_text(config)
    return folder / "accelerate.yaml"


def launch(shapes: Path, out: Path, mode: str, *extra: str) -> list[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    how = ["--multi_gpu"] if mode == "ddp" else ["--config_file", str(accelerate_config(mode, out))]
    return [sys.executable, "-m", "accelerate.commands.launch", *how, "--num_processes", "2", "--mixed_precision",
            "no", "--main_process_port", str(port), "-m", "finetune", "train",
            str(ROOT / "finetune" / "configs" / "tiny_shapes.yaml"), *overrides(shapes, out), *extra]


def run(cmd: list[str], kind: str) -> None:
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # really two ranks sharing the batch (not two lone processes that would also match one process)
    assert f"processes: 2 ({kind})" in done.stdout and done.stdout.count("done: 6 steps") == 1, done.stdout[-2000:]


def weights(folder: Path) -> dict[str, object]:
    return {f"{f.relative_to(folder)}:{k}": v for f in sorted(folder.rglob("*.safetensors"))
            for k, v in load_file(f).items()}


def same_run(a: Path, b: Path, curve: Callable[[Path], dict[int, float]]) -> None:
    """Runs `a` and `b` took the same steps: equal loss curves (`curve` reads one) and equal exported weights."""
    ca, cb = curve(a), curve(b)
    assert sorted(ca) == sorted(cb) == [1, 2, 3, 4, 5, 6]
    assert all(ca[s] == pytest.approx(cb[s], rel=1e-5) for s in ca)
    wa, wb = weights(a), weights(b)
    assert sorted(wa) == sorted(wb) and any("adapter" in k for k in wa) and any("encoder" in k for k in wa)
    assert all((wa[k] - wb[k]).abs().max() < 1e-4 for k in wa), [k for k in wa if (wa[k] - wb[k]).abs().max() >= 1e-4]


@pytest.mark.parametrize("mode", ["ddp", "zero2", "zero3"])
def test_two_ranks_take_the_same_steps_as_one(mode: str, shapes, one_process, tmp_path: Path, loss_curve) -> None:
    run(launch(shapes, tmp_path, mode), "MULTI_CPU" if mode == "ddp" else "DEEPSPEED")
    same_run(one_process, tmp_path, loss_curve)
    if mode != "ddp":  # the engine wrote the sharded optimizer (one file per rank) and no plain trainable.pt
        ckpt = tmp_path / "checkpoints" / "step-0000003"
        assert len(list((ckpt / "engine").glob("*optim_states.pt"))) == 2 and not (ckpt / "trainable.pt").exists()
    from assistant.engine import Assistant
    assert Assistant.from_pretrained(tmp_path, device="cpu", dtype="float32").config.lora.r == 4


@pytest.mark.parametrize("mode", ["zero2", "zero3"])
def test_a_killed_zero_run_resumes_on_the_same_loss_curve(mode: str, shapes, one_process, tmp_path: Path,
                                                          kill_at_checkpoint, loss_curve) -> None:
    kill_at_checkpoint(launch(shapes, tmp_path, mode), tmp_path, 3)
    run(launch(shapes, tmp_path, mode, "--resume"), "DEEPSPEED")
    same_run(one_process, tmp_path, loss_curve)
