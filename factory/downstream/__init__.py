"""The consumer side: training with the factory's outputs.

mix_spec.py     a mix of real and synthetic data, and its strategy (each paper's law)
mix.py          the mixing laws and the loader without torch (`MixBatches`: numpy batches)
mix_torch.py    the loader for torch's DataLoader (`MixDataset`), SENSE's teacher labels
mix_streams.py  the real and synthetic sample streams a loader draws from
mix_ray.py      the same loader on Ray Data + Ray Train
eval_spec.py    `factory eval`'s spec
eval.py         `factory eval`: arms x seeds, paired intervals, the plot
eval_worker.py  one Ray Train worker of `factory eval`: train, score the held-out split
segmenter.py    the segmenters eval trains
"""
