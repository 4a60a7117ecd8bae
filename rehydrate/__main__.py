"""`python -m rehydrate`: the same command as `rehydrate`."""

from rehydrate.cli import main

main()
