"""The fine-tuning API under its original name: everything lives in `qwen2vl.training` (this module only re-exports
it, so `from qwen2vl.train import Trainer` and `python -m qwen2vl.train` keep working)."""
import sys

from .training import *  # noqa: F401,F403
from .training import __all__, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
