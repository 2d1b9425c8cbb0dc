"""`python -m qwen2vl.training ...` = `qwen2vl train ...`."""
import sys

from .command import main

sys.exit(main())
