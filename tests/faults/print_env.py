"""`python -m tests.faults.print_env`: print the job's environment variable names and values, one per line
(the Slurm variant of tests/faults/test_secrets.py runs it as a job to see what sbatch exported)."""

import os

if __name__ == "__main__":
    for name, value in sorted(os.environ.items()):
        print(f"{name}={value}")
