"""Helpers for tests that need real infrastructure (network namespaces, ...).

Nothing here is imported by the rest of the package at run time.
"""
