# A package, so this folder's conftest.py is "security.conftest" and does not
# replace tests/conftest.py as the module "conftest" that test files import.
