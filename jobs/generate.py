"""Entry point for `ray job submit --working-dir . -- python -m jobs.generate --spec URI`.

The same as `shardgen run`: the spec may sit on local disk or on object storage.
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
