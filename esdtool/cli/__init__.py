"""The esdtool command line: thin Typer commands over the library."""
