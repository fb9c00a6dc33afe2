"""`python -m esdtool` runs the CLI (also what `torchrun -m esdtool` uses)."""

from esdtool.cli.app import main

if __name__ == "__main__":
    main()
