"""Job entrypoint: ``python -m services.entrypoint --config <file>``.

The same driver as ``privimage run``; under ``ray job submit`` it joins the
job's cluster instead of starting a local Ray.
"""
import sys

from services.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
