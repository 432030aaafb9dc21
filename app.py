"""Entry point for `python app.py [flags]`, Hugging Face Spaces and Docker: build from settings, launch."""

from rlhf_demo.cli import serve_main

if __name__ == "__main__":
    serve_main()
