"""`python -m rlhf_demo serve|worker|export|train-once`."""

from rlhf_demo.cli import main

main()
