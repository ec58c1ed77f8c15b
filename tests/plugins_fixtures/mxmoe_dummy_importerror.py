"""A plugin that cannot be imported (as when a native dependency is missing)."""

raise ImportError("libdummy.so.1: cannot open shared object file")
