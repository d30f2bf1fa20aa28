# A package, like tests/security: its modules are "compat.test_twisted" and
# so on, and they import the shared helper as "compat.helpers" (a plain
# "helpers" would be a top-level module any other test folder could shadow).
