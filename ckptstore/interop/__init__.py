"""Other formats: export to safetensors / torch.save / zarr, import from DCP / torch.save / safetensors, the zarr view."""
