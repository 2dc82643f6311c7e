"""``python -m pipeline ...`` is ``nla-pipeline ...`` (and what ``accelerate launch -m pipeline`` runs)."""
import sys

from pipeline.cli import main

# The guard matters: vLLM (verbalize.engine=vllm) starts its workers by spawn, and a spawned child
# imports this module again; without it, the child would run the CLI a second time.
if __name__ == "__main__":
    sys.exit(main())
