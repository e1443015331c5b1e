"""The ``ckpt`` command line tool."""
