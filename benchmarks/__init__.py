"""Speed and memory benchmarks of ft-prog against transformers + PEFT (run with `python -m benchmarks`)."""
