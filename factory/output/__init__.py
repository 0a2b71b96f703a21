"""The output of a job, for the engine that writes it and everything that reads it.

layout.py      every file of an output by name, and `OutputStore`, which reads and writes them
samples.py     reading committed shards: samples, decoded arrays, failure records
selections.py  the key files of `factory select`
scores.py      the scores a sample's json carries: names, how each is computed, flattening
"""
