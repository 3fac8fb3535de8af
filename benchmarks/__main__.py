"""``python -m benchmarks [--preset quick|cpu-target|gpu] ...``: see :mod:`benchmarks.harness`."""

from benchmarks.harness import main

if __name__ == "__main__":
    main()
