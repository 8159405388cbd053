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


def test_public_predictor_api_reproduces_fixture(fixture_a):
    """The user-facing path (Prompt -> TapPredictor.predict) gives the official masks, concepts and captions."""
    from tokenizer_tap import Prompt, TAPConfig, TapPredictor
    from tokenizer_tap.checkpoint import load_concepts, load_weights
    from tokenizer_tap.modeling import TAP
    from tokenizer_tap.text_tokenizer import TextTokenizer

    config = json.loads((fixture_a / "config.json").read_text())
    model = TAP(TAPConfig.from_dict(config["model"]))
    load_weights(model, fixture_a / "checkpoint.pkl")
    model.float().eval().concept_projector.reset_weights(*load_concepts(fixture_a / "concepts.pkl"))
    predictor = TapPredictor(model, TextTokenizer((fixture_a / config["tokenizer"]).resolve()))
    predictor.set_image(fixture_a / "image.png")
    ref = np.load(fixture_a / "expected.npz")
    sets = json.loads((fixture_a / "prompts.json").read_text())["prompt_sets"]
    prompts = []
    for ps in sets:
        rows = [r for r in ps["points"] if r[2] != 4]  # Prompt.rows adds the pad row itself
        box = [r for r in rows if r[2] in (2, 3)]
        points = [r for r in rows if r[2] in (0, 1)]
        prompts.append(Prompt(points=[r[:2] for r in points], labels=[int(r[2]) for r in points],
                              box=(*box[0][:2], *box[1][:2]) if box else None))
    for ps, region in zip(sets, predictor.predict(prompts, top_k=1)):
        p = ps["name"] + "_"
        assert region.mask_index == int(ref[p + "mask_index"][0])
        assert region.concept == str(ref[p + "concept_name"][0])
        assert abs(region.concept_prob - float(ref[p + "concept_prob"][0])) < 1e-5
        assert abs(region.iou - float(ref[p + "iou_pred"][0, region.mask_index])) < 5e-6
        assert region.caption == str(ref[p + "caption"][0])
        assert np.count_nonzero(region.mask != ref[p + "masks"][0]) <= int(ref[p + "masks_near_zero"][0])
