"""ckptstore as torch DCP's storage layer: the one-line switch for code that already uses
``torch.distributed.checkpoint`` (torchtitan, torchtune, your own).

    import torch.distributed.checkpoint as dcp
    import ckptstore as cs

    dcp.save(state_dict, storage_writer=cs.dcp.Writer("s3://bucket/run/step_100"))
    dcp.load(state_dict, storage_reader=cs.dcp.Reader("s3://bucket/run/step_100"))

What DCP writes through :class:`Writer` is a ckptstore checkpoint (JSON manifest, crc32c,
any store): ``cs.open``, ``ckpt`` and ``cs.load`` read it, and :class:`Reader` reads any
ckptstore checkpoint.
"""

from ckptstore.interop.dcp_storage import Reader, Writer

__all__ = ["Reader", "Writer"]
