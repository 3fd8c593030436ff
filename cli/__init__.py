"""The ``hpt-dsl`` command line: thin typer commands over the library."""
