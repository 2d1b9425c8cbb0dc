"""`python -m qwen2vl.server [args]`: the same as `qwen2vl serve [args]`."""
import sys

from .startup import main

if __name__ == "__main__":
    sys.exit(main())
