"""``python -m fedseg``: the ``fedseg`` command without its console script."""

from fedseg.cli.main import main

main()
