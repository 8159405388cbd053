"""`tap-priors` with a tiny random transformers CLIP on SA-1B-layout data written here, bad SA-1B input fed to
`tap-priors` and `tap-train` alike, and MAE initialisation of TAP's image encoder from a tiny random MAE (no
downloads)."""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from finetune.tap.mae import init_from_mae
from finetune.tap.priors import Priors
from finetune.tap.records import BadRecords, ImageSample, RegionAnn, encode_rle, open_sa1b, tar_bytes
from finetune.tap.teacher import (
    add_arguments,
    concept_matrix,
    embed_shard,
    load_teacher,
    read_concept_names,
    run,
    segment_crop,
)
from tokenizer_tap.config import TAPConfig
from tokenizer_tap.errors import CheckpointError
from tokenizer_tap.modeling.image_encoder import ImageEncoder

CONCEPTS = ["cat", "dog", "red car", "tree"]
MASKS_PER_IMAGE = 3


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    """A random 16-d CLIP with 32 px images and a word-level tokenizer, saved like a hub checkpoint."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("clip")
    words = ["<|startoftext|>", "<|endoftext|>", "[UNK]", "a", "photo", "of", "cat", "dog", "red", "car", "tree"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                            pad_token="<|endoftext|>", unk_token="[UNK]").save_pretrained(folder)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": len(words), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 16, "bos_token_id": 0,
                     "eos_token_id": 1, "pad_token_id": 1},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def teacher(clip_folder):
    return load_teacher(str(clip_folder), device="cpu")


def scene(i: int) -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(i)
    image = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    masks = []
    for k in range(MASKS_PER_IMAGE):
        m = np.zeros((40, 56), bool)
        m[4 + 8 * k:14 + 8 * k, 3 + 10 * k:30 + 5 * k] = True
        masks.append(m)
    return image, masks


def sa1b_files(i: int) -> dict[str, bytes]:
    """One SA-1B image and its annotation JSON (compressed RLE), as file name -> bytes."""
    image, masks = scene(i)
    anns = []
    for k, m in enumerate(masks):
        ys, xs = np.nonzero(m)
        anns.append({"id": 100 * i + k, "segmentation": encode_rle(m), "area": int(m.sum()),
                     "bbox": [int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1]})
    meta = {"image": {"image_id": i, "width": 56, "height": 40, "file_name": f"sa_{i}.jpg"}, "annotations": anns}
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")  # lossless, so tests can recompute a crop exactly
    return {f"sa_{i}.jpg": out.getvalue(), f"sa_{i}.json": json.dumps(meta).encode()}


@pytest.fixture
def sa1b_folder(tmp_path) -> Path:
    folder = tmp_path / "sa1b"
    folder.mkdir()
    for i in range(5):
        for name, data in sa1b_files(i).items():
            (folder / name).write_bytes(data)
    return folder


@pytest.fixture
def concepts_file(tmp_path) -> Path:
    path = tmp_path / "concepts.txt"
    path.write_text("\n".join(CONCEPTS) + "\n\n")
    return path


def priors_args(sa1b: Path, out: Path, clip: Path, concepts: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["--sa1b", str(sa1b), "--out", str(out), "--clip", str(clip), "--concepts",
                              str(concepts), "--device", "cpu", "--batch-size", "4", "--workers", "2", *extra])


def shard_files(out: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(out.glob("shard-*.safetensors"))}


def test_priors_of_a_folder_have_one_fp16_embedding_per_mask_and_the_scaled_concept_matrix(
        sa1b_folder, tmp_path, clip_folder, concepts_file, teacher, capsys):
    out = tmp_path / "priors"
    assert run(priors_args(sa1b_folder, out, clip_folder, concepts_file, "--shard-size", "2")) == 0
    assert list(shard_files(out)) == [f"shard-n2-{i:06d}.safetensors" for i in range(3)]
    with safe_open(str(out / "shard-n2-000000.safetensors"), framework="pt") as f:
        emb = f.get_tensor("embeddings")
    assert emb.dtype == torch.float16 and emb.shape == (2 * MASKS_PER_IMAGE, 16)

    priors = Priors(out)
    assert len(priors) == 5 * MASKS_PER_IMAGE and priors.dim == 16
    assert priors.teacher == f"hf:{clip_folder}"
    # The stored prior is the teacher's embedding of that mask's segment crop.
    image, masks = scene(3)
    expected = teacher.encode_images([segment_crop(image, masks[1], teacher.fill)])
    torch.testing.assert_close(priors.embeddings(["3/301"]), expected, atol=2e-3, rtol=2e-3)

    weights, names = priors.concepts()
    assert names == CONCEPTS and weights.shape == (16, len(CONCEPTS))
    # Columns are unit vectors times exp(logit_scale) (2.6592 at init: 14.29).
    torch.testing.assert_close(weights.norm(dim=0), torch.full((4,), teacher.logit_scale), rtol=1e-5, atol=1e-5)
    assert teacher.logit_scale == pytest.approx(np.exp(2.6592), rel=1e-4)
    # Template averaging: the mean of the normalised per-template text embeddings.
    per = [torch.nn.functional.normalize(teacher.encode_texts([t.format(n) for n in CONCEPTS]), dim=-1)
           for t in ("a {}", "a photo of a {}")]
    torch.testing.assert_close(weights.T / teacher.logit_scale,
                               torch.nn.functional.normalize(per[0] + per[1], dim=-1), rtol=1e-5, atol=1e-5)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["templates"] == ["a {}", "a photo of a {}"]
    assert "15 masks from 5 images" in capsys.readouterr().out


def test_resume_skips_finished_shards_and_recomputes_only_missing_ones(
        sa1b_folder, tmp_path, clip_folder, concepts_file, capsys):
    out = tmp_path / "priors"
    args = priors_args(sa1b_folder, out, clip_folder, concepts_file, "--shard-size", "2")
    run(args)
    before = shard_files(out)
    run(args)
    assert shard_files(out) == before  # nothing rewritten
    assert "0 shards computed, 3 already there" in capsys.readouterr().out
    (out / "shard-n2-000001.safetensors").unlink()
    run(args)
    after = shard_files(out)
    assert set(after) == set(before)
    assert {k for k in after if after[k] != before[k]} == {"shard-n2-000001.safetensors"}
    assert len(Priors(out)) == 5 * MASKS_PER_IMAGE
    capsys.readouterr()
    assert run(priors_args(sa1b_folder, out, clip_folder, concepts_file, "--shard-size", "2", "--templates", "{}")) == 2
    assert "use another --out" in capsys.readouterr().err


def test_two_ranks_share_tar_shards_and_cover_each_once(tmp_path, clip_folder, concepts_file, monkeypatch):
    shards = tmp_path / "tars"
    shards.mkdir()
    for s in range(3):  # sa_000000.tar ... each with 2 images
        members = {}
        for i in (2 * s, 2 * s + 1):
            members.update(sa1b_files(i))
        (shards / f"sa_{s:06d}.tar").write_bytes(tar_bytes(members))
    out = tmp_path / "priors"
    written = {}
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        before = set(shard_files(out)) if out.exists() else set()
        run(priors_args(shards, out, clip_folder, concepts_file))
        written[rank] = set(shard_files(out)) - before
    assert written == {0: {"shard-sa_000000.safetensors", "shard-sa_000002.safetensors"},
                       1: {"shard-sa_000001.safetensors"}}
    keys = []
    for path in out.glob("shard-*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            keys += json.loads(f.metadata()["keys"])
    assert sorted(keys) == sorted(f"{i}/{100 * i + k}" for i in range(6) for k in range(MASKS_PER_IMAGE))
    assert (out / "concepts.safetensors").is_file()  # rank 0 writes the vocabulary


def test_masked_segment_embeds_differently_from_the_whole_image(teacher):
    image, masks = scene(0)
    crop = segment_crop(image, masks[0], teacher.fill)
    ys, xs = np.nonzero(masks[0])
    assert crop.shape[0] == crop.shape[1] >= max(np.ptp(ys), np.ptp(xs)) + 1
    assert (crop == teacher.fill).all(axis=-1).any()  # outside the mask: the mean colour
    segment, whole = teacher.encode_images([crop, image])
    assert not torch.allclose(segment, whole, atol=1e-3)


def test_bf16_autocast_matches_fp32(clip_folder, teacher):
    """The GPU path (bf16 autocast over fp32 weights), run on the CPU."""
    half = load_teacher(f"hf:{clip_folder}", device="cpu", dtype="bf16")
    assert half.dtype == torch.bfloat16 and half.description == f"hf:{clip_folder}"
    images = [scene(i)[0] for i in range(3)]
    cos = torch.nn.functional.cosine_similarity(half.encode_images(images), teacher.encode_images(images))
    assert cos.min() > 0.98
    with pytest.raises(ValueError, match="--dtype"):
        load_teacher(str(clip_folder), device="cpu", dtype="fp8")


def test_empty_masks_and_unreadable_images_are_counted_not_fatal(teacher):
    image, masks = scene(1)
    empty = RegionAnn("1/9", (0, 0, 1, 1), np.zeros_like(masks[0]))
    samples = [None, ImageSample("1", image, [RegionAnn("1/100", (0, 0, 9, 9), masks[0]), empty])]

    class Fake:
        bad = BadRecords()
        name = "fake"

        def __len__(self) -> int:
            return len(samples)

        def __getitem__(self, i: int) -> ImageSample | None:
            return samples[i]

    keys, emb, stats = embed_shard(teacher, Fake(), range(2), batch_size=8)
    assert keys == ["1/100"] and emb.shape == (1, 16)
    assert (stats.images, stats.masks, stats.empty_masks, stats.unreadable_images) == (1, 1, 1, 1)
    assert segment_crop(image, np.zeros_like(masks[0]), teacher.fill) is None


def test_concept_names_from_an_official_pickle_or_text_and_template_checks(tmp_path, teacher):
    pkl = tmp_path / "merged_2560.pkl"
    with open(pkl, "wb") as f:
        pickle.dump([np.zeros((8, 2), np.float32), ["cat", "dog"]], f)
    assert read_concept_names(pkl) == ["cat", "dog"]
    with pytest.raises(ValueError, match="no concept names"):
        (tmp_path / "empty.txt").write_text("\n")
        read_concept_names(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="needs a"):
        concept_matrix(teacher, ["cat"], ["a photo"])


def test_open_clip_backend_missing_gives_a_clear_message():
    try:
        import open_clip  # noqa: F401
        pytest.skip("open_clip is installed here")
    except Exception:
        pass
    with pytest.raises(ValueError, match="open_clip backend is unavailable"):
        load_teacher("EVA02-E-14-plus:laion2b_s9b_b144k", device="cpu")


def test_user_errors_are_messages_with_exit_code_2(sa1b_folder, tmp_path, clip_folder, concepts_file, capsys):
    cases = [(priors_args(tmp_path / "nowhere", tmp_path / "o", clip_folder, concepts_file), "no such SA-1B"),
             (priors_args(sa1b_folder, tmp_path / "o", tmp_path / "no-clip", concepts_file), "open_clip"),
             (priors_args(sa1b_folder, tmp_path / "o", clip_folder, tmp_path / "none.txt"), "no such file"),
             (priors_args(sa1b_folder, tmp_path / "o", clip_folder, concepts_file, "--templates", "a"), "needs a {}")]
    for args, message in cases:
        assert run(args) == 2
        assert message in capsys.readouterr().err


def test_sa1b_folder_is_readable_by_records(sa1b_folder):
    """The layout written here is the one `records` reads (guards the other tests' fixtures)."""
    ds = open_sa1b(sa1b_folder)
    sample = ds[0]
    assert len(ds) == 5 and len(sample.regions) == MASKS_PER_IMAGE and not ds.bad.counts


# ------------------------------------------------------------------------------------------------ bad input
ROOT = Path(__file__).resolve().parents[1]
#: Address space of the bad-input runs: all of them in one process peaked at 0.95 GB here (torch, a 64 px tiny TAP,
#: the tiny CLIP; one thread and two malloc arenas, so a many-core machine reserves no more). Decoding the huge RLE
#: below would take 10 GB.
MEMORY_CEILING = 4 << 30
#: Runs `python -m finetune` argument lists in one process under the ceiling (one torch import for all of them)
#: and writes each one's exit code, stdout and stderr; an exception that escapes `main` is written as a traceback
#: (pycocotools does not check malloc: an allocation over the ceiling in its decoder kills the whole process).
RUNNER = """
import contextlib, io, json, resource, sys, traceback
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]), int(sys.argv[1])))
from finetune.cli import main
results = {}
for name, argv in json.loads(open(sys.argv[2]).read()).items():
    print(name, file=sys.stderr, flush=True)  # the last one named is the one that killed the process, if any
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
            code = 0
        except SystemExit as exc:
            code = exc.code
        except BaseException:
            traceback.print_exc()
            code = 1
    results[name] = {"code": code, "out": out.getvalue(), "err": err.getvalue()}
open(sys.argv[3], "w").write(json.dumps(results))
"""


def huge_rle() -> dict:
    """A well-formed RLE of 100000 x 100000 pixels: about 10 GB once decoded."""
    from pycocotools import mask as mask_utils
    runs = {"size": [100_000, 100_000], "counts": [4_000_000_000, 4_000_000_000, 2_000_000_000]}
    return {"size": runs["size"], "counts": mask_utils.frPyObjects(runs, 100_000, 100_000)["counts"].decode()}


def edit_mask(change: Callable[[dict], object]) -> Callable[[dict[str, bytes]], None]:
    """Break annotation 0 of image 1 only (its other masks and the other images stay good)."""
    def edit(files: dict[str, bytes]) -> None:
        meta = json.loads(files["sa_1.json"])
        change(meta["annotations"][0])
        files["sa_1.json"] = json.dumps(meta).encode()
    return edit


def replace(name: str, data: bytes) -> Callable[[dict[str, bytes]], None]:
    return lambda files: files.update({name: data})


def without(name: str) -> Callable[[dict[str, bytes]], None]:
    return lambda files: files.pop(name)


@dataclass
class BadInput:
    """Four good SA-1B images, one thing broken, and what both CLIs must say about it."""

    edit: Callable[[dict[str, bytes]], None] | None  # changes the files (name -> bytes); None: keep them
    layout: str  # folder | tar (one shard) | cut tar (cut in half) | junk tar (not a tar) | missing (no such path)
    problem: str  # said in the one message (a whole bad input) or in the bad-records summary
    file: str  # the file that is named with it
    images: int = 0  # images still used around one bad record; 0: the whole input is refused (exit code 2)
    masks: int = 0

    def build(self, folder: Path) -> Path:
        files: dict[str, bytes] = {}
        for i in range(4):
            files.update(sa1b_files(i))
        if self.edit is not None:
            self.edit(files)
        folder.mkdir(parents=True)
        if self.layout == "missing":
            return folder / "nowhere"
        if self.layout == "folder":
            for name, data in files.items():
                (folder / name).write_bytes(data)
            return folder
        data = b"not a tar " * 200 if self.layout == "junk tar" else tar_bytes(files)
        (folder / "sa_000000.tar").write_bytes(data[:len(data) // 2] if self.layout == "cut tar" else data)
        return folder / "sa_000000.tar"


BAD_INPUTS = {
    "truncated tar": BadInput(None, "cut tar", "truncated", "sa_000000.tar"),
    "not a tar": BadInput(None, "junk tar", "not an uncompressed tar archive", "sa_000000.tar"),
    "missing folder": BadInput(None, "missing", "no such sa-1b folder", "nowhere"),
    "empty folder": BadInput(lambda files: files.clear(), "folder", "no sa-1b annotations", "empty_folder"),
    "corrupt image bytes": BadInput(replace("sa_2.jpg", b"not an image"), "folder", "missing or corrupt image",
                                    "sa_2.jpg", 3, 9),
    "image missing from the shard": BadInput(without("sa_2.jpg"), "tar", "missing or corrupt image",
                                             "sa_000000.tar:sa_2.json", 3, 9),
    "non-JSON annotation": BadInput(replace("sa_3.json", b"{not json"), "folder", "unreadable annotation JSON",
                                    "sa_3.json", 3, 9),
    "RLE size mismatch": BadInput(edit_mask(lambda a: a["segmentation"].update(size=[41, 56])), "folder",
                                  "mask size differs from the image", "sa_1.json annotation 100", 4, 11),
    "huge declared RLE": BadInput(edit_mask(lambda a: a.update(segmentation=huge_rle())), "tar",
                                  "mask size differs from the image", "sa_000000.tar:sa_1.json annotation 100", 4, 11),
    "malformed counts": BadInput(edit_mask(lambda a: a["segmentation"].update(counts="0!!")), "folder", "broken RLE",
                                 "sa_1.json annotation 100", 4, 11),
    "missing bbox": BadInput(edit_mask(lambda a: a.pop("bbox")), "folder", "missing box", "sa_1.json annotation 100",
                             4, 11),
}


@pytest.fixture(scope="module")
def bad_input_runs(tmp_path_factory, clip_folder) -> dict[str, dict]:
    """Every bad input through `tap-train` (tiny stage 1, one step of the four images) and `tap-priors`."""
    root = tmp_path_factory.mktemp("bad-input")
    concepts = root / "concepts.txt"
    concepts.write_text("\n".join(CONCEPTS))
    runs = {}
    for name, case in BAD_INPUTS.items():
        path = case.build(root / name.replace(" ", "_"))
        runs[f"tap-train {name}"] = [
            "tap-train", str(ROOT / "finetune" / "configs" / "tap_world_stage1.yaml"), f"data.sa1b={path}",
            "data.priors=", f"output_dir={root / 'train' / name}", "max_steps=1", "global_batch=4", "micro_batch=4",
            "sampler.prompts_per_image=2", "save_every=0", "report_to=[]", "model.overrides={image_size: 64, "
            "window_size: 4, sem_embed_dim: 256, image_embed_dim: 128, decoder_mlp_dim: 512}"]
        runs[f"tap-priors {name}"] = ["tap-priors", "--sa1b", str(path), "--out", str(root / "priors" / name),
                                      "--clip", str(clip_folder), "--concepts", str(concepts), "--device", "cpu",
                                      "--batch-size", "4", "--workers", "2"]
    (root / "runs.json").write_text(json.dumps(runs))
    done = subprocess.run([sys.executable, "-c", RUNNER, str(MEMORY_CEILING), str(root / "runs.json"),
                           str(root / "results.json")], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((root / "results.json").read_text())


@pytest.mark.parametrize("command", ["tap-train", "tap-priors"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_stops_with_one_message_or_is_counted_and_skipped(bad_input_runs, case, command):
    """A bad whole input: exit code 2 and one line naming the file and the problem. A bad record: listed in the
    bad-records summary, and the good images and masks around it are still used. Never a traceback, and never
    more memory than the ceiling (the huge RLE is refused before it is decoded)."""
    c, run = BAD_INPUTS[case], bad_input_runs[f"{command} {case}"]
    assert "Traceback" not in run["err"] + run["out"], run["err"][-3000:]
    if not c.images:
        said = [line for line in run["err"].splitlines() if c.problem in line.lower() and c.file in line]
        assert run["code"] == 2 and len(said) == 1, run["err"]
        return
    assert run["code"] == 0, run["err"][-3000:]
    listed = [line for line in run["out"].splitlines() if line.startswith(f"{c.problem}: 1 (e.g. ")
              or line.startswith(f"bad records: {c.problem}: 1 (e.g. ")]
    assert len(listed) == 1 and c.file in listed[0], run["out"]
    if command == "tap-train":
        assert f"done: 1 steps over {c.images} images" in run["out"] and "bad records: 1;" in run["out"], run["out"]
    else:
        assert f"{c.masks} masks from {c.images} images" in run["out"], run["out"]


# ------------------------------------------------------------------------------------------------------ MAE
@pytest.fixture(scope="module")
def mae_folder(tmp_path_factory) -> Path:
    from transformers import ViTMAEConfig, ViTMAEForPreTraining
    torch.manual_seed(0)
    config = ViTMAEConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=1, intermediate_size=256,
                          image_size=32, patch_size=16, decoder_hidden_size=32, decoder_num_hidden_layers=1,
                          decoder_num_attention_heads=1, decoder_intermediate_size=64, layer_norm_eps=1e-5)
    model = ViTMAEForPreTraining(config)
    with torch.no_grad():  # random biases, norms and positions, so a wrong mapping cannot hide behind init values
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias") or "position" in name:
                p.normal_(0.5, 0.3)
    folder = tmp_path_factory.mktemp("mae")
    model.save_pretrained(folder)
    return folder


def tap_encoder(**overrides) -> ImageEncoder:
    c = TAPConfig(**{"encoder_depth": 4, "encoder_embed_dim": 64, "encoder_num_heads": 1, "image_size": 64,
                     "window_size": 2, **overrides})
    return ImageEncoder(c.encoder_depth, c.encoder_embed_dim, c.encoder_num_heads, c.encoder_mlp_ratio,
                        c.patch_size, c.window_size, c.grid_size, c.image_embed_dim, c.cross_indices)


def test_mae_weights_map_onto_the_encoder_and_a_block_computes_the_same(mae_folder):
    from transformers import ViTMAEModel
    mae = ViTMAEModel.from_pretrained(mae_folder).eval()
    encoder = tap_encoder().eval()
    neck_before = encoder.neck.lateral_conv[0][0].weight.clone()
    report = init_from_mae(encoder, str(mae_folder))

    x = torch.randn(3, 4, 64)  # 3 windows of 4 tokens
    block = encoder.blocks[2]
    torch.nn.init.zeros_(block.attn.rel_pos_embed.weight)  # the part MAE does not have
    with torch.no_grad():
        ours = block(x, block.attn.rel_pos_embed(x.dtype))
        theirs = mae.layers[2](x)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(encoder.norm(x), mae.layernorm(x))
        # Patch embedding: TAP reads BGR, MAE RGB, with the same normalisation: same features.
        image = torch.randn(1, 3, 32, 32)
        torch.testing.assert_close(encoder.patch_embed(image.flip(1)),
                                   mae.embeddings.patch_embeddings.projection(image), atol=1e-5, rtol=1e-5)
    # Positions: MAE's 2x2 sin-cos grid (cls dropped), bicubic to our 4x4 grid; corners stay close to the source.
    table = mae.embeddings.position_embeddings[0, 1:].reshape(2, 2, 64)
    ours_pos = encoder.pos_embed.weight.detach().reshape(4, 4, 64)
    assert (ours_pos[0, 0] - table[0, 0]).abs().max() < (ours_pos[0, 0] - table[1, 1]).abs().max()

    assert len(report.mapped) == 5 + 4 * 12  # per block: qkv, proj, norm1, norm2, fc1, fc2 (weight + bias)
    assert report.mapped["blocks.1.attn.qkv.weight"] == [f"layers.1.attention.{p}_proj.weight" for p in "qkv"]
    assert sorted({k.split(".")[0] for k in report.left_at_init}) == ["blocks", "cross_conv", "neck"]
    assert all("rel_pos_embed" in k for k in report.left_at_init if k.startswith("blocks"))
    assert "embeddings.cls_token" in report.unused and any(k.startswith("decoder.") for k in report.unused)
    assert torch.equal(encoder.neck.lateral_conv[0][0].weight, neck_before)  # left at init
    summary = report.summary()
    assert "53 tensors mapped" in summary and "neck (6)" in summary and "resized bicubically" in summary


def test_mae_of_another_size_or_not_mae_is_refused(mae_folder, clip_folder):
    with pytest.raises(ValueError, match="use the MAE of the same size"):
        init_from_mae(tap_encoder(encoder_depth=8), str(mae_folder))
    with pytest.raises(CheckpointError, match="not an MAE"):
        init_from_mae(tap_encoder(), str(clip_folder))
