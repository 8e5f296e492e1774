# check.py is a standalone script for a GPU machine, run by hand; pytest must not import it.
collect_ignore_glob = ["*.py"]
