"""``python -m twincd.sandbox.apiserver --name eks --port 6441``: one API server in the foreground."""

from twincd.sandbox.apiserver.serve import main

main()
