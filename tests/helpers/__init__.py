"""Test helpers shared by the test folders (test code only)."""
