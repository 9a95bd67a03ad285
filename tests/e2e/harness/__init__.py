"""Test harness for the end-to-end suites: a private containerd, ctr helpers, images and leak checks.

Everything here talks to a real containerd, real runc and real shims; nothing is mocked.
"""
