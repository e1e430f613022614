"""Applications built on the core (`convcli demo`): they import the core, never the reverse.

Unlike the core, an application may speak the CLI's language: the demo prints the
`convcli ...` command behind each of its steps. Its data ships inside the package
(`demo_data/`), so it runs from an ordinary install.
"""
