import os
import signal
import sys

from .cli import _on_sigint, main

signal.signal(signal.SIGINT, _on_sigint)  # before anything heavy is imported
code = main()
if code == 130:  # interrupted: exit 130 even if the interpreter saw the KeyboardInterrupt
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)
sys.exit(code)
