"""Tools for operating a deployment: the dead-letter topic."""
