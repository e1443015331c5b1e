"""A load: match the state_dict to the manifest, plan byte ranges, read, verify and copy; the
:class:`Checkpoint` reader behind ``cs.open`` and its zarr view."""
