import sys

from .runner import main

try:
    sys.exit(main())
except KeyboardInterrupt as e:
    print(f"benchmarks: interrupted ({e or 'Ctrl-C'}); mounts unmounted, work directory removed",
          file=sys.stderr)
    sys.exit(130)
