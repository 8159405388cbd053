"""Training TAP-Chat: TAP's own region-level pre-training (`tap/`, the figure's boxes trained from masks, concept
priors and captions), and the chat stages: caption pre-training (stage 1) and instruction fine-tuning (stage 2)
with LoRA/QLoRA.

`python -m finetune check CONFIG` validates the data before any GPU time is spent; `python -m finetune train CONFIG
[key=value ...] [--resume]` trains on CPU, one GPU, or many through `accelerate launch` / `torchrun`, and writes an
assistant checkpoint folder that the assistant, its CLI and the app load as is.
"""
