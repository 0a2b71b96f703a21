"""The engine: a job spec becomes committed shards.

spec.py        the job spec: validation naming the field, the content hash that decides resume
driver.py      `run_job`: checks, lease, plan, pending shards, progress, failed shards, index
checks.py      the job against the cluster it is about to run on
lease.py       one run writes an output at a time
pinning.py     the job's weights pinned when it is planned, held to on resume
shard_plan.py  the listing cut into shards, stored as parquet
reader.py      the read step: a shard's samples from the source
runner.py      one stage worker: batches, the failure policy, the row contract
writer.py      encoding and the shard commit protocol
records.py     what crosses a boundary: a shard's result, a failure, a stage's stats, the job's info
errors.py      failures by kind, retries, one-line causes and advice
progress.py    the progress line
metrics.py     Ray metrics for Prometheus
watch.py       each step's record and deadline
reaper.py      stops a local Ray's agents when its driver dies
submit.py      `factory submit` and `factory logs` (Ray Jobs API)
executors/     the ways of running shards: Ray Data actor pools, plain Ray tasks, in process
"""
