"""Start the demo's S3 server again (SeaweedFS on 127.0.0.1:8333, over ``demo-out/seaweed``)
so that the ``ckpt`` examples of docs/cli.md work against the checkpoints ``make demo``
left on it. Prints the environment to export and the buckets; stops on Ctrl-C or SIGTERM.

    make s3        # or: .venv/bin/python tools/s3_server.py [DATA_DIR]
"""

from __future__ import annotations

import os
import signal
import sys
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> int:
    from ckptstore.testing.seaweed import SeaweedServer

    data = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "demo-out", "seaweed")
    if not os.path.isdir(data):
        print(f"{data}: no such directory (run `make demo` first)", file=sys.stderr)
        return 2
    server = SeaweedServer(data)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        opts = server.options()
        buckets = [b["Name"] for b in server.client().list_buckets().get("Buckets", [])]
        print("S3 server up (SeaweedFS). In another shell:\n")
        print(f"  export AWS_ENDPOINT_URL={opts['endpoint_url']}")
        print(f"  export AWS_ACCESS_KEY_ID={opts['aws_access_key_id']}")
        print(f"  export AWS_SECRET_ACCESS_KEY={opts['aws_secret_access_key']}")
        for bucket in buckets:
            print(f"  .venv/bin/ckpt ls s3://{bucket}/run")
        print("\nCtrl-C stops it.", flush=True)
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
