"""``python -m mechscope.cli``: the same command as ``mechscope``."""

from mechscope.cli import main

main()
