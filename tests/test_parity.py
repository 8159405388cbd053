"""Our implementation reproduces the official outputs stored in the parity fixture."""

import json
import shutil
import subprocess
import sys

import numpy as np

from tokenizer_tap.parity import run_parity


def test_fixture_a_all_arrays_match(fixture_a):
    checks = run_parity(fixture_a)
    failed = [c.line() for c in checks if not c.passed]
    assert not failed, "\n".join(failed)
    names = {c.name for c in checks}
    # Every family of outputs the issue lists is actually compared.
    for required in ["img_batch_uint8", "input", "image_embedding", "p0_mask_logits", "p3_iou_pred", "p2_masks",
                     "p1_sem_embeds", "p1_sem_tokens", "p0_concept_index", "p2_caption_tokens", "batch_caption",
                     "teacher_logits", "tokenizer(teacher_text)"]:
        assert required in names
    assert len(checks) >= 60


def test_checker_detects_a_wrong_output(fixture_a, tmp_path):
    """A fixture whose expected embedding is off by 1e-3 must fail: the checker is not vacuous."""
    for f in fixture_a.iterdir():
        (tmp_path / f.name).symlink_to(f)
    (tmp_path / "expected.npz").unlink()
    ref = dict(np.load(fixture_a / "expected.npz"))
    ref["image_embedding"] = ref["image_embedding"] + 1e-3
    ref["p1_caption"] = np.array(["not the caption"])
    np.savez(tmp_path / "expected.npz", **ref)
    config = json.loads((fixture_a / "config.json").read_text())
    (tmp_path / "config.json").unlink()
    config["tokenizer"] = str((fixture_a / config["tokenizer"]).resolve())
    (tmp_path / "config.json").write_text(json.dumps(config))
    failed = {c.name for c in run_parity(tmp_path) if not c.passed}
    assert failed == {"image_embedding", "p1_caption"}


def test_parity_cli_exit_code(fixture_a, tmp_path):
    ok = subprocess.run([sys.executable, "-m", "tokenizer_tap", "parity", str(fixture_a)], capture_output=True,
                        text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "0 failed" in ok.stdout and "FAIL" not in ok.stdout
    shutil.copytree(fixture_a, tmp_path / "broken", symlinks=False, ignore=shutil.ignore_patterns("checkpoint.pkl"))
    (tmp_path / "broken" / "checkpoint.pkl").write_bytes(b"not a pickle")
    config = json.loads((tmp_path / "broken" / "config.json").read_text())
    config["tokenizer"] = str((fixture_a / config["tokenizer"]).resolve())
    (tmp_path / "broken" / "config.json").write_text(json.dumps(config))
    bad = subprocess.run([sys.executable, "-m", "tokenizer_tap", "parity", str(tmp_path / "broken")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "error:" in bad.stderr and "Traceback" not in bad.stderr
