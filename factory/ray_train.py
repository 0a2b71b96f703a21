"""One Ray Train fit for the two trainers of the factory: SegGen's models (`factory train`) and the
segmenters `factory eval` compares. Both run a loop on a TorchTrainer sized by their spec."""

from __future__ import annotations

import tempfile


def fit_on_ray(loop, config: dict, spec, name: str, address: str | None, workers: int | None = None) -> None:
    """Run `loop(config)` on a TorchTrainer of `workers` (default: the spec's num_workers), sized by the spec's
    use_gpu and cpus_per_worker; raise the workers' error if one failed."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from factory.engine.ray_session import init_ray

    init_ray(address, dashboard=True)
    with tempfile.TemporaryDirectory() as ray_storage:
        # Ray Train keeps only its run bookkeeping here: models and results go to the output, from rank 0.
        result = TorchTrainer(
            loop,
            train_loop_config=config,
            scaling_config=ScalingConfig(
                num_workers=workers or spec.num_workers,
                use_gpu=spec.use_gpu,
                resources_per_worker={"CPU": spec.cpus_per_worker},
            ),
            run_config=RunConfig(name=name, storage_path=ray_storage),
        ).fit()
    if result.error is not None:
        raise result.error
