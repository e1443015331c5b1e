"""The on-disk format, a versioned contract (``docs/format.md``): the manifest, its validation
rules and bulk parsing, chunk layouts, dtypes, checksums, codecs, the data files chunks are
packed into, the atomic commit point, verification, bounded-memory regions, and how a
checkpoint maps to zarr. Depends on the Stores (``ckptstore.backends``) and nothing above."""
