"""The KL autoencoder (first_stage_model)."""
