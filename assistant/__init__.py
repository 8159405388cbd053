"""assistant: the TAP-Chat engine (Phi-2 + TAP visual tokens and region grounding)."""
