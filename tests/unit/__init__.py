"""Tests that need no server: settings, parsing, the compose stack, upcasting, the import layers."""
