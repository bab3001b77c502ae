"""The CLIP text tower (cond_stage_model)."""
