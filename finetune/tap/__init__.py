"""TAP region-level pre-training (the paper's §3.1): masks + CLIP concept priors (stage 1), then region captions
(stage 2), for `tap_tiny` ... `tap_vit_xl`, from scratch, from MAE weights or from the official v1.1 weights.

Modules: `records` reads SA-1B / COCO / Visual Genome data, `priors` stores CLIP concept priors, `teacher` computes
them (`tap-priors`), `sampler` draws the two-stage prompts, `losses` holds L_seg / L_concept / L_cap, `trainer` runs
`tap-train`, and `world` writes the synthetic scene world the tests and benchmarks learn from.
"""
