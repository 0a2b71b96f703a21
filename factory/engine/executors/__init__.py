"""The ways of running a job's pending shards; each yields one `ShardResult` per shard as it finishes.

ray_data.py    jobs with stages: read tasks, actor pools per stage, write tasks (Ray Data)
ray_tasks.py   jobs without stages: one plain Ray task per shard, from read to commit
in_process.py  no Ray: the stages in this process (`factory stage`, the benchmarks' reference)
base.py        the contract they share (Executor, ShardJob); choice.py picks one for a job
"""
