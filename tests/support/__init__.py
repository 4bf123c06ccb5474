"""Test equipment shared by the suites: fakes for in-process tests (the real-service tests use sandboxes)."""
