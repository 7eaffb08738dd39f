"""`python -m hf_moe`: the `hf-moe` command (`python -m hf_moe --help`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
