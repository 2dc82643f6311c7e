"""``python -m pipeline ...`` is ``nla-pipeline ...`` (and what ``accelerate launch -m pipeline`` runs)."""
import sys

from pipeline.cli import main

sys.exit(main())
