"""Submit sbatch jobs and follow them to the end, through Slurm's own command-line clients.

The clients (`sbatch`, `scontrol`, `sacct`) find the cluster through `SLURM_CONF` or
/etc/slurm/slurm.conf, as for any user. Job states are read with `scontrol show job -o`, which knows
every live job and keeps finished ones for `MinJobAge` seconds; `sacct` answers for jobs that
`scontrol` has forgotten, where the cluster keeps accounting (the local test cluster has no slurmdbd
and sets MinJobAge=3600 instead).
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterable, Sequence

from core.secrets import scrub_argv, scrub_text

_CLIENT_TIMEOUT_S = 60.0

# States after which Slurm will never run the job again (squeue(1), "JOB STATE CODES"). A requeued
# job passes through COMPLETING/REQUEUED back to PENDING, none of which is here.
TERMINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "SPECIAL_EXIT",
        "TIMEOUT",
    }
)
# A job whose dependency failed waits forever unless the cluster sets kill_invalid_depend; report it
# as final under this name instead of waiting for a timeout.
DEPENDENCY_NEVER_SATISFIED = "DEPENDENCY_NEVER_SATISFIED"

_FIELD = re.compile(r"(?:^|\s)(\w+)=(\S*)")
_PARSABLE_ID = re.compile(r"^(\d+)(?:;\S+)?$")
_SUBMITTED_ID = re.compile(r"Submitted batch job (\d+)")


class SlurmError(RuntimeError):
    """A Slurm client failed; the message carries its command line and stderr, credentials masked."""

    def __init__(self, message: str) -> None:
        super().__init__(scrub_text(message))


def _shown(argv: Sequence[str]) -> str:
    """A client's command line as error messages show it: credentials in the job's overrides masked."""
    return " ".join(scrub_argv(argv))


def sbatch_command(
    script: str,
    *,
    job_name: str,
    nodes: int,
    ntasks_per_node: int,
    cpus_per_task: int,
    gres: str | None,
    time: str,
    partition: str | None,
    account: str | None,
    qos: str | None,
    output: str,
    dependency: Sequence[str] | None = None,
    array: str | None = None,
    extra: Sequence[str] = (),
    args: Sequence[str] = (),
) -> list[str]:
    """The argv of `sbatch --parsable` for `script`; `args` go to the script after it.

    `dependency` lists job ids that must all succeed first (`--dependency=afterok:ID:ID`); `array` is
    sbatch's array spec (e.g. "0-7%2"); `extra` holds further sbatch options, passed as given.
    Command-line options override the script's `#SBATCH` defaults.
    """
    for name, value in (
        ("nodes", nodes),
        ("ntasks_per_node", ntasks_per_node),
        ("cpus_per_task", cpus_per_task),
    ):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    argv = [
        "sbatch",
        "--parsable",
        f"--job-name={job_name}",
        f"--nodes={nodes}",
        f"--ntasks-per-node={ntasks_per_node}",
        f"--cpus-per-task={cpus_per_task}",
        f"--time={time}",
        f"--output={output}",
    ]
    optional = {"gres": gres, "partition": partition, "account": account, "qos": qos, "array": array}
    argv += [f"--{flag}={value}" for flag, value in optional.items() if value]
    if dependency:
        argv.append("--dependency=afterok:" + ":".join(str(job_id) for job_id in dependency))
    return [*argv, *extra, script, *args]


def submit(argv: Sequence[str]) -> str:
    """Run an sbatch command line and return the job id it printed.

    Raises:
        SlurmError: sbatch exited non-zero (its stderr is in the message) or printed no job id.
    """
    stdout = _run(argv)
    last_line = stdout.strip().splitlines()[-1] if stdout.strip() else ""
    match = _PARSABLE_ID.match(last_line) or _SUBMITTED_ID.search(stdout)
    if match is None:
        raise SlurmError(f"no job id in the output of {_shown(argv)!r}: {stdout!r}")
    return match.group(1)


def job_state(job_id: str) -> str:
    """The Slurm state of a job (e.g. "PENDING", "RUNNING", "COMPLETED", "FAILED").

    For an array job the state of the whole array: the first unfinished task's state while any task
    is unfinished, then COMPLETED if every task completed, else the first other final state.
    A job held forever by a failed dependency reads DEPENDENCY_NEVER_SATISFIED.

    Raises:
        SlurmError: neither scontrol nor sacct knows the job.
    """
    records = _scontrol_records(job_id)
    states = [_record_state(record) for record in records] if records else _sacct_states(job_id)
    return _combine(states)


def wait_for(job_ids: str | Iterable[str], timeout: float, poll: float = 1.0) -> dict[str, str]:
    """Poll until every job is final; return each job's final state (failures are returned, not raised).

    Raises:
        TimeoutError: some job is unfinished after `timeout` seconds (the message lists the states).
        SlurmError: a job is unknown to Slurm.
    """
    ids = [job_ids] if isinstance(job_ids, str) else job_ids  # one id, not its characters
    order = list(dict.fromkeys(str(job_id) for job_id in ids))
    pending = order
    final: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while True:
        current = {job_id: job_state(job_id) for job_id in pending}
        final.update({job_id: state for job_id, state in current.items() if _is_final(state)})
        pending = [job_id for job_id in pending if job_id not in final]
        if not pending:
            return {job_id: final[job_id] for job_id in order}
        if time.monotonic() >= deadline:
            raise TimeoutError(f"Slurm jobs not finished after {timeout:g} s: {current}")
        time.sleep(poll)


def _is_final(state: str) -> bool:
    return state in TERMINAL_STATES or state == DEPENDENCY_NEVER_SATISFIED


def _combine(states: Sequence[str]) -> str:
    unfinished = [state for state in states if not _is_final(state)]
    if unfinished:
        return unfinished[0]
    failed = [state for state in states if state != "COMPLETED"]
    return failed[0] if failed else "COMPLETED"


def _record_state(record: dict[str, str]) -> str:
    state = record.get("JobState", "UNKNOWN")
    if state == "PENDING" and record.get("Reason") == "DependencyNeverSatisfied":
        return DEPENDENCY_NEVER_SATISFIED
    return state


def _scontrol_records(job_id: str) -> list[dict[str, str]]:
    """One dict per line of `scontrol show job -o` (an array job prints a line per task); [] if unknown."""
    try:
        stdout = _run(["scontrol", "show", "job", "-o", job_id])
    except SlurmError as error:
        if "Invalid job id" in str(error):
            return []
        raise
    return [_parse_fields(line) for line in stdout.splitlines() if line.strip()]


def _parse_fields(line: str) -> dict[str, str]:
    # First occurrence wins: JobId/JobState/Reason come before free-text fields such as Command.
    fields: dict[str, str] = {}
    for key, value in _FIELD.findall(line):
        fields.setdefault(key, value)
    return fields


def _sacct_states(job_id: str) -> list[str]:
    try:
        stdout = _run(
            ["sacct", "--noheader", "--parsable2", "--allocations", "--jobs", job_id, "--format=State"]
        )
    except SlurmError as error:
        raise SlurmError(f"job {job_id} unknown to scontrol, and sacct cannot tell: {error}") from error
    # sacct writes e.g. "CANCELLED by 0": the state is the first word.
    states = [line.split()[0] for line in stdout.splitlines() if line.strip()]
    if not states:
        raise SlurmError(f"job {job_id} unknown to both scontrol and sacct")
    return states


def _run(argv: Sequence[str]) -> str:
    try:
        result = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=_CLIENT_TIMEOUT_S, check=False
        )
    except FileNotFoundError as error:
        raise SlurmError(
            f"{argv[0]} not found: is Slurm installed (slurm/local_cluster.sh start)?"
        ) from error
    except subprocess.TimeoutExpired as error:
        raise SlurmError(f"{_shown(argv)} timed out after {_CLIENT_TIMEOUT_S:g} s") from error
    if result.returncode != 0:
        raise SlurmError(
            f"{_shown(argv)} failed with exit code {result.returncode}: {result.stderr.strip()}"
        )
    return result.stdout
