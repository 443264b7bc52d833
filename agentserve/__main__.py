"""`python -m agentserve ...` runs the `agentserve` command (agentserve/cli.py), as `python -m vllm` does vLLM's."""

import sys

from agentserve.cli import main

if __name__ == "__main__":
    sys.exit(main())
