"""Tests, core tier (pure: the core and other logic on values, no sockets, files or processes)."""
