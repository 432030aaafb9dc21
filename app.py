"""Entry point for `python app.py [flags]`, Hugging Face Spaces and Docker: build from settings, launch."""

import sys

from rlhf_demo.cli import main

if __name__ == "__main__":
    main(["serve", *sys.argv[1:]])
