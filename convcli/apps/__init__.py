"""Applications built on the core (`convcli demo`): they import the core, never the reverse.

Their data ships inside the package (`demo_data/`), so they run from an ordinary install.
"""
