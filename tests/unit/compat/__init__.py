# A package, like every folder of tests/: its modules are
# "unit.compat.test_twisted" and so on, and they import the shared helper as
# ".helpers" (a plain "helpers" would be a top-level module any other test
# folder could shadow).
