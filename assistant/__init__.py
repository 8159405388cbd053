"""assistant: the TAP-Chat engine (Phi-2 + TAP visual tokens and region grounding). Outside the TAP figure: the
multimodal LLM its visual tokens feed (projector + Phi-2), with conversations, storage and serving."""
