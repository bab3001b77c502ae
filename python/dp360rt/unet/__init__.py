"""UNet-shaped networks: the denoiser, the appearance net (bank writer), the pose ControlNet."""
