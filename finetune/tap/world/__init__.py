"""The synthetic scene world (`python -m finetune tap-world OUT`): the data that proves TAP pre-training learns.

Scenes like examples/scene.jpg (sky, sun, clouds, hills, grass, houses, trees, cars, people, boats, coloured
shapes, ...) are drawn in painter's order onto the image and, with the same calls, onto a label map, so every mask
is exact: the visible pixels of its object. Masks under `MIN_AREA` pixels (hidden or tiny) are dropped. As in
SA-1B, objects and their parts are separate masks (house / wall, roof, door, window; tree / trunk, leaves; car /
wheel, window), so a point prompt is ambiguous, and stuff (sky, grass, hills, roads) has masks too.

Output, every byte a function of the arguments:
- `train/` and `eval/`: SA-1B layout, `sa_<id>.jpg` + `sa_<id>.json` (what `records.open_sa1b` reads);
- `priors/`: concept priors in the `tap-priors` format, by the same writer. The teacher is simulated: the concepts
  have fixed random orthonormal vectors, and a mask's V_C is its concept's vector plus Gaussian noise. As with CLIP
  at width 1024, the cosine to the own concept is small (~0.14 at the default noise) and the logit scale 100 turns
  its few-point lead into a target that is confident (top-1 right ~98 % of the time) but not one-hot;
- `concepts.txt`: the vocabulary, one name a line (also usable as `tap-priors --concepts`);
- `captions_<split>.json`: one short grounded caption per mask ("a red car left of a white house", "the brown door
  of a house") in Visual Genome's official `region_descriptions.json` format. `region_id` is the SA-1B annotation
  id and `id` the SA-1B image id, so captions and priors share keys (`mask_key`). VG looks images up as
  `<image_id>.jpg`, so each split folder also holds that name, hard-linked to `sa_<image_id>.jpg`;
- `world.json`: per image, every mask's concept, colour, box, position word, parent / parts and relations to the
  other objects (left of, above, in front of, ...): the answers to colour / count / position / relation questions.

Image ids: train 1..N, eval from `EVAL_BASE` + 1; each image is drawn from its own seed (seed, split, index), so the
eval images do not depend on --train. Annotation ids are image_id * 1000 + k, unique across the world.

Modules, one idea each: `canvas` (image and label map drawn together, palette), `draw` (objects and scene layout),
`scene` (regions, relations, captions: `render`) and `write` (the files above, instance exports, the CLI).
"""

from tokenizer_tap.region import PLACES

from .canvas import BRIGHT, PALETTE, Canvas, Thing
from .draw import GROUND, SHAPES, SKIES, draw_scene
from .scene import (
    CONCEPTS,
    EVAL_BASE,
    MIN_AREA,
    MIN_OCCLUSION,
    SPLITS,
    Annotation,
    Scene,
    describe,
    image_id,
    mask_box,
    render,
)
from .write import (
    CHUNK,
    FORMAT,
    LOGIT_SCALE,
    add_arguments,
    concept_vectors,
    export_instances,
    load_labels,
    make_world,
    run,
    sa1b_record,
    world_entry,
)

__all__ = [
    "BRIGHT", "CHUNK", "CONCEPTS", "EVAL_BASE", "FORMAT", "GROUND", "LOGIT_SCALE", "MIN_AREA", "MIN_OCCLUSION",
    "PALETTE", "PLACES", "SHAPES", "SKIES", "SPLITS", "Annotation", "Canvas", "Scene", "Thing", "add_arguments",
    "concept_vectors", "describe", "draw_scene", "export_instances", "image_id", "load_labels", "make_world",
    "mask_box", "render", "run", "sa1b_record", "world_entry",
]
