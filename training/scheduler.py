"""What a batch scheduler means for a run's directory and record: which job (and array task, and restart) a start
ran as, how long a run-directory lock held by another node is waited for under SLURM, and the type of the
filesystem a directory is on (locking is a property of the mount: Lustre without -o flock, NFS with nolock)."""
import os
import re

LOCK_WAIT_S = 300  # under SLURM: Lustre / NFS release a crashed node's lock after its eviction / lease (~90-300 s)
LOCK_POLL_S = 5


def _count(value: str | None):
    try:
        return int(value or 0)
    except ValueError:
        return value  # recorded as it is


def job_identity() -> dict | None:
    """The scheduler's job this process runs in, for the record's history (None outside one): SLURM's job id (the
    array's id and the task's index for an array task) and its restart count (SLURM_RESTART_COUNT, which
    `scontrol requeue` raises); under submitit's local executor its job id, and the restarts launch/job.py counts
    ($JOB_RESTART_COUNT)."""
    env = os.environ
    if env.get("SLURM_JOB_ID"):
        array_task = env.get("SLURM_ARRAY_TASK_ID")
        return {"scheduler": "slurm", "job_id": env.get("SLURM_ARRAY_JOB_ID") if array_task else env["SLURM_JOB_ID"],
                "array_task": _count(array_task) if array_task else None,
                "restart_count": _count(env.get("SLURM_RESTART_COUNT"))}
    for executor in ("local", "debug"):
        job_id = env.get(f"SUBMITIT_{executor.upper()}_JOB_ID")
        if job_id:
            return {"scheduler": f"submitit-{executor}", "job_id": job_id, "array_task": None,
                    "restart_count": _count(env.get("JOB_RESTART_COUNT"))}
    return None


def lock_wait_seconds() -> float:
    """How long a run directory locked by another process is waited for before giving up: LOCK_WAIT_S in a SLURM
    job (a requeued job may start while the shared filesystem still holds the lock of its previous node), else 0
    (a second run into a directory in use is refused at once)."""
    return LOCK_WAIT_S if os.environ.get("SLURM_JOB_ID") else 0


def filesystem_type(path: str) -> str:
    """The type of the filesystem `path` is on (ext4, nfs4, lustre, ...), from /proc/self/mountinfo: the mount
    point that is the longest prefix of the resolved path. 'unknown' where that cannot be read."""
    target = os.path.realpath(path)
    best, kind = "", "unknown"
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields, _, rest = line.partition(" - ")
                parts = fields.split()
                if len(parts) < 5 or not rest:
                    continue
                mount = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), parts[4])  # \040: a space
                inside = target == mount or target.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best):
                    best, kind = mount, rest.split()[0]
    except OSError:
        pass
    return kind
