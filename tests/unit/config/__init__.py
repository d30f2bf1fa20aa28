# A package: tests/README.md
