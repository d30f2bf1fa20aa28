"""Helpers shared by the test tiers (tests/README.md); no tests here."""
