"""The mixing loader (factory.downstream.mix): each strategy's sampling law, exact masks, the split of shards across
DataLoader workers and ranks, filters, S3, SENSE's teacher, and the Ray Data variant under Ray Train.

Laws are checked on counts from a fixed seed: a binomial test on the synthetic share, a chi-square test on
the per-batch counts against the binomial pmf and on the variant and source frequencies against uniform
(p-values above 0.001), and exact enumeration where the law is deterministic.
"""

import numpy as np
import pytest
import torch
from output_builder import Item, build_output
from PIL import Image
from scipy import stats

from factory.downstream.mix import PSEUDO, REAL, SYNTHETIC, MixBatches, parse_mix_spec, slot_kinds
from factory.downstream.mix_ray import ray_datasets, ray_train_batches
from factory.downstream.mix_torch import MixDataset, pseudo_label
from factory.output.layout import OutputStore
from factory.schema import SpecError
from factory.sources.scenes import make_scenes
from factory.tools.top_fraction import select_top

pytestmark = pytest.mark.timeout(300)

N_REAL, SIZE = 24, 16
SOURCES, K = 12, 4  # synthetic groups and variants per group


def folder(path) -> dict:
    return {
        "kind": "folder",
        "path": str(path),
        "classes": "ade150",
        "image_suffix": "_image.png",
        "mask_suffix": "_mask.png",
    }


def synthetic_items(shard: int, sources: range, k: int = K, masked=True, seed: int = 0) -> list[Item]:
    """Group g (source `src-g`) has k variants; each variant's scores.density.instances is its number."""
    rng = np.random.default_rng([seed, shard])
    items = []
    for g in sources:
        for v in range(k):
            image = rng.integers(0, 256, (SIZE, SIZE, 3), np.uint8)
            mask = rng.choice(np.array([0, 2, 12, 149, 255], np.uint8), (SIZE, SIZE)) if masked else None
            items.append(
                Item(f"{shard:06d}-{g:06d}-{v}", f"src-{g}", image, mask, {"scores": {"density": {"instances": v}}})
            )
    return items


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    make_scenes(root / "real", count=N_REAL, size=SIZE, style="varied")
    shards = {s: synthetic_items(s, range(s * 3, s * 3 + 3)) for s in range(SOURCES // 3)}
    out = build_output(OutputStore(str(root / "synth")), shards)
    unlabelled = build_output(
        OutputStore(str(root / "unlabelled")), {0: synthetic_items(0, range(4), k=1, masked=False)}
    )
    masks = {item.key: item.mask for items in shards.values() for item in items}
    return root, out, unlabelled, masks


def spec(data, strategy: dict, **changes) -> dict:
    root, out, _, _ = data
    synthetic = [] if strategy["kind"] == "real" else [{"url": out.url}]
    return {
        "real": folder(root / "real"),
        "synthetic": synthetic,
        "strategy": strategy,
        "batch_size": 8,
        "seed": 3,
        **changes,
    }


def batches(spec_data: dict, n: int, **kw) -> list[dict]:
    it = iter(MixDataset(parse_mix_spec(spec_data), **kw))
    return [next(it) for _ in range(n)]


def test_spec_errors_name_the_field(data, tmp_path):
    good = spec(data, {"kind": "seggen"})
    assert parse_mix_spec(good).strategy.p == 0.6
    assert parse_mix_spec(spec(data, {"kind": "diffusion_synthesis"})).strategy.alpha == 0.5
    for change, field in (
        ({"strategy": {"kind": "seggen", "p": 1.5}}, "strategy.seggen.p"),
        ({"strategy": {"kind": "mixup"}}, "strategy"),
        ({"synthetic": [{"url": "x", "min": {"density.crowd": 1}}]}, "synthetic[0].min"),
        ({"batch_size": 0}, "batch_size"),
        ({"strategy": {"kind": "sense"}, "batch_size": 7}, "even"),
        ({"synthetic": []}, "at least one `synthetic`"),
    ):
        with pytest.raises(SpecError, match=field.replace("[", r"\[").replace("]", r"\]")):
            parse_mix_spec({**good, **change})
    wrong_classes = build_output(
        OutputStore(str(tmp_path / "voc")), {0: synthetic_items(0, range(1))}, classes=["background", "cat"]
    )
    with pytest.raises(SpecError, match=r"synthetic\[0\].url: .* labels with 2 classes"):
        MixDataset(parse_mix_spec({**good, "synthetic": [{"url": wrong_classes.url}]}))
    with pytest.raises(FileNotFoundError, match="no selection 'best'"):
        MixDataset(parse_mix_spec({**good, "synthetic": [{"url": data[1].url, "selection": "best"}]}))


def kinds(bs: list[dict]) -> np.ndarray:
    return np.stack([b["kind"].numpy() for b in bs])


def test_seggen_replaces_each_slot_with_probability_p(data):
    p, n = 0.3, 300
    bs = batches(spec(data, {"kind": "seggen", "p": p}), n)
    synthetic = kinds(bs) == SYNTHETIC
    assert set(np.unique(kinds(bs))) == {REAL, SYNTHETIC}
    # Every batch is exactly the law's draw for that batch index...
    mixed = parse_mix_spec(spec(data, {"kind": "seggen", "p": p}))
    assert all(np.array_equal(synthetic[b], slot_kinds(mixed, 0, b)) for b in range(n))
    # ...and the draws follow it: Binomial(n * B, p) overall, Binomial(B, p) per batch.
    assert stats.binomtest(int(synthetic.sum()), synthetic.size, p).pvalue > 1e-3
    per_batch = np.bincount(synthetic.sum(axis=1), minlength=9)
    expected = stats.binom.pmf(np.arange(9), 8, p) * n
    observed = [per_batch[:1].sum(), *per_batch[1:5], per_batch[5:].sum()]  # pool the sparse tails
    pooled = [expected[:1].sum(), *expected[1:5], expected[5:].sum()]
    assert stats.chisquare(observed, pooled).pvalue > 1e-3
    # Real slots hold real scenes, synthetic slots the output's samples.
    keys = [(k, key) for b in bs for k, key in zip(b["kind"].tolist(), b["key"])]
    assert all(key.startswith("scene-") == (k == REAL) for k, key in keys)


def test_diffusion_synthesis_draws_a_uniform_source_then_a_uniform_variant(data):
    alpha, n = 0.5, 200
    bs = batches(spec(data, {"kind": "diffusion_synthesis", "alpha": alpha}, shuffle_buffer=4), n)
    synthetic = kinds(bs) == SYNTHETIC
    assert stats.binomtest(int(synthetic.sum()), synthetic.size, alpha).pvalue > 1e-3
    drawn = [
        (sid, key) for b in bs for k, sid, key in zip(b["kind"].tolist(), b["source_id"], b["key"]) if k == SYNTHETIC
    ]
    sources = np.array([int(sid.rsplit("-", 1)[1]) for sid, _ in drawn])
    variants = np.array([int(key.rsplit("-", 1)[1]) for _, key in drawn])
    assert stats.chisquare(np.bincount(sources, minlength=SOURCES)).pvalue > 1e-3
    assert stats.chisquare(np.bincount(variants, minlength=K)).pvalue > 1e-3
    # Filtered variants are never drawn; the source's other variants share its draws.
    bs = batches(
        spec(
            data,
            {"kind": "diffusion_synthesis", "alpha": 1.0},
            synthetic=[{"url": data[1].url, "min": {"density.instances": 2}}],
        ),
        40,
    )
    assert {int(key.rsplit("-", 1)[1]) for b in bs for key in b["key"]} == {2, 3}


def test_seggen_pretrain_is_synthetic_first_then_real(data):
    bs = batches(spec(data, {"kind": "seggen_pretrain", "pretrain_batches": 3}, batch_size=4), 6)
    assert kinds(bs).tolist() == [[SYNTHETIC] * 4] * 3 + [[REAL] * 4] * 3


def test_sense_batches_are_half_real_half_synthetic_and_the_teacher_labels_confident_pixels(data):
    root, _, unlabelled, _ = data
    bs = batches(spec(data, {"kind": "sense"}, synthetic=[{"url": unlabelled.url}]), 5)
    assert kinds(bs).tolist() == [[REAL] * 4 + [SYNTHETIC] * 4] * 5
    batch = bs[0]
    assert batch["labelled"].tolist() == [True] * 4 + [False] * 4
    assert (batch["mask"][4:] == 255).all()  # no mask yet: all ignore

    class Teacher(torch.nn.Module):
        """Sure of class 12 (p = 0.993) where red >= 128, else unsure: all 150 classes alike (p = 1/150)."""

        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))

        def forward(self, x):
            logits = torch.zeros(x.shape[0], 150, *x.shape[2:])
            logits[:, 12] = torch.where(x[:, 0] > 0.5, 10.0, 0.0)
            return logits * self.scale

    labelled = pseudo_label(batch, Teacher(), threshold=0.9)
    red = batch["image"][4:, 0] >= 128
    expected = torch.where(red, torch.tensor(12), torch.tensor(255))
    assert torch.equal(labelled["mask"][4:], expected)
    assert torch.equal(labelled["mask"][:4], batch["mask"][:4])  # real samples untouched
    assert labelled["kind"].tolist() == [REAL] * 4 + [PSEUDO] * 4 and labelled["labelled"].all()


def test_masks_decode_exactly(data):
    _, _, _, masks = data
    bs = batches(spec(data, {"kind": "seggen", "p": 0.5}), 20)
    root = data[0] / "real"
    for b in bs:
        assert b["image"].dtype == torch.uint8 and b["image"].shape == (8, 3, SIZE, SIZE)
        assert b["mask"].dtype == torch.int64
        for mask, key, kind in zip(b["mask"], b["key"], b["kind"].tolist()):
            want = masks[key] if kind == SYNTHETIC else np.asarray(Image.open(root / f"{key}_mask.png"))
            assert np.array_equal(mask.numpy(), want)


def test_the_numpy_loader_gives_the_torch_loaders_batches(data):
    """`MixBatches` (the core install, no torch) and `MixDataset` yield the same batches, value for value."""
    spec_data = spec(data, {"kind": "diffusion_synthesis", "alpha": 0.5})
    plain = MixBatches(parse_mix_spec(spec_data), rank=1, world=2).batches()
    for tensors in batches(spec_data, 6, rank=1, world=2):
        arrays = next(plain)
        assert arrays.keys() == tensors.keys() and isinstance(arrays["image"], np.ndarray)
        for k, v in arrays.items():
            assert np.array_equal(v, tensors[k].numpy()) if isinstance(v, np.ndarray) else v == tensors[k]


def test_uint16_masks_decode_exactly(tmp_path):
    names = [f"class{i}" for i in range(300)]
    rng = np.random.default_rng(5)
    (tmp_path / "real").mkdir()
    values = np.array([0, 255, 299, 65535], np.uint16)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), np.uint8)).save(tmp_path / "real" / f"r{i}_image.png")
        Image.fromarray(rng.choice(values, (8, 8))).save(tmp_path / "real" / f"r{i}_mask.png")
    item = Item("000000-000000", "r0", rng.integers(0, 256, (8, 8, 3), np.uint8), rng.choice(values, (8, 8)))
    out = build_output(OutputStore(str(tmp_path / "out")), {0: [item]}, classes=names)
    real = {**folder(tmp_path / "real"), "classes": names, "min_side": 1}
    b = batches({"real": real, "synthetic": [{"url": out.url}], "strategy": {"kind": "sense"}, "batch_size": 4}, 1)[0]
    assert np.array_equal(b["mask"][2].numpy(), item.mask) and b["mask"].max() == 65535
    assert np.array_equal(b["mask"][0].numpy(), np.asarray(Image.open(tmp_path / "real" / f"{b['key'][0]}_mask.png")))


def shares(spec_data: dict, world: int, workers: int, n: int) -> list[list[list[str]]]:
    """Per (rank, loader worker): the keys of its first n batches, read through real DataLoader workers."""
    out = []
    for rank in range(world):
        loader = torch.utils.data.DataLoader(
            MixDataset(parse_mix_spec(spec_data), rank=rank, world=world), batch_size=None, num_workers=workers
        )
        it = iter(loader)
        got = [next(it)["key"] for _ in range(n * workers)]
        out += [[k for b in got[w::workers] for k in b] for w in range(workers)]
        del it, loader
    return out


@pytest.mark.integration
def test_shards_and_ids_split_across_dataloader_workers_and_ranks(data, tmp_path):
    # Real: 24 ids over 2 ranks x 2 workers; batches of 3, so each reader's first 2 batches are its epoch.
    real = shares(spec(data, {"kind": "real"}, batch_size=3), world=2, workers=2, n=2)
    assert sorted(k for share in real for k in share) == [f"scene-{i:05d}" for i in range(N_REAL)]
    # Synthetic, more shards than readers: 8 shards of 3 samples, 2 shards per reader.
    many = build_output(OutputStore(str(tmp_path / "many")), {s: synthetic_items(s, [s], k=3) for s in range(8)})
    pre = {"kind": "seggen_pretrain", "pretrain_batches": 10}
    got = shares(spec(data, pre, synthetic=[{"url": many.url}], batch_size=3), 2, 2, 2)
    assert sorted(k for share in got for k in share) == sorted(
        f"{s:06d}-{s:06d}-{v}" for s in range(8) for v in range(3)
    )
    assert all(len({k[:6] for k in share}) == 2 for share in got)  # whole shards per reader
    # Fewer shards than readers: every reader reads both shards and keeps its sources, variants together.
    few = build_output(
        OutputStore(str(tmp_path / "few")), {s: synthetic_items(s, range(4 * s, 4 * s + 4), k=2) for s in range(2)}
    )
    got = shares(spec(data, pre, synthetic=[{"url": few.url}], batch_size=2), 2, 2, 2)
    assert sorted(k for share in got for k in share) == sorted(
        f"{s:06d}-{g:06d}-{v}" for s in range(2) for g in range(4 * s, 4 * s + 4) for v in range(2)
    )
    for share in got:
        groups = {k.rsplit("-", 1)[0] for k in share}
        assert len(groups) == 2 and sorted(share) == sorted(f"{g}-{v}" for g in groups for v in range(2))


@pytest.mark.integration
def test_selection_and_s3(data, s3_server, tmp_path):
    import s3fs

    root, out, _, masks = data
    _, options = s3_server
    fs = s3fs.S3FileSystem(**options)
    fs.put(str(root / "real"), "test/mix-real", recursive=True)
    store = build_output(
        OutputStore("s3://test/mix-synth", options),
        {s: synthetic_items(s, range(s * 3, s * 3 + 3)) for s in range(SOURCES // 3)},
    )
    select_top(store, "density.instances", 0.25, name="best")  # keeps variant 3 of every source
    mix = {
        "real": {**folder("s3://test/mix-real"), "storage_options": options},
        "synthetic": [{"url": "s3://test/mix-synth", "storage_options": options, "selection": "best"}],
        "strategy": {"kind": "seggen", "p": 0.5},
        "batch_size": 8,
        "seed": 1,
    }
    bs = batches(mix, 10)
    synthetic_keys = {k for b in bs for k, kind in zip(b["key"], b["kind"].tolist()) if kind == SYNTHETIC}
    assert synthetic_keys and all(k.endswith("-3") for k in synthetic_keys)
    for b in bs:
        for mask, key, kind in zip(b["mask"], b["key"], b["kind"].tolist()):
            want = masks[key] if kind == SYNTHETIC else np.asarray(Image.open(root / "real" / f"{key}_mask.png"))
            assert np.array_equal(mask.numpy(), want)


def _ray_worker(config):
    import ray.train

    from factory.downstream.mix import MixSpec

    spec = MixSpec.model_validate(config["spec"])
    it = ray_train_batches(spec)
    got = [next(it) for _ in range(config["batches"])]
    rank = ray.train.get_context().get_world_rank()
    keys = [k for b in got for k in b["key"]]
    kinds_ = [k for b in got for k in b["kind"].tolist()]
    masks_ok = all(b["mask"].dtype == torch.int64 and b["image"].dtype == torch.uint8 for b in got)
    (config["out"] / f"rank{rank}.txt").write_text(
        "\n".join(f"{k} {kind}" for k, kind in zip(keys, kinds_)) + f"\n#{masks_ok}"
    )


@pytest.mark.e2e
def test_ray_data_variant_under_ray_train(data, ray_local, tmp_path):
    from ray.data import DataContext
    from ray.train import DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    DataContext.get_current().enable_progress_bars = False
    mix = parse_mix_spec(spec(data, {"kind": "sense"}, batch_size=4))
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={"spec": mix.model_dump(mode="json"), "batches": 4, "out": tmp_path},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 0.5}),
        datasets=ray_datasets(mix, world=2, num_cpus=0.25),
        dataset_config=DataConfig(datasets_to_split=[]),
        run_config=RunConfig(storage_path=str(tmp_path / "ray")),
    )
    trainer.fit()
    per_rank = []
    for rank in range(2):
        *rows, ok = (tmp_path / f"rank{rank}.txt").read_text().splitlines()
        assert ok == "#True"
        pairs = [r.split() for r in rows]
        assert [int(k) for _, k in pairs] == [REAL, REAL, SYNTHETIC, SYNTHETIC] * 4  # SENSE's law, exactly
        per_rank.append({key for key, kind in pairs if int(kind) == REAL})
    # Each worker reads its own share of the real ids: 12 each, so 8 real draws are all distinct.
    assert all(len(s) == 8 for s in per_rank) and not per_rank[0] & per_rank[1]


def test_transforms_keep_image_and_mask_aligned(data):
    from factory.downstream.mix import transform

    rng = np.random.default_rng(0)
    mask = np.tile(np.arange(20, dtype=np.uint8), (12, 1))  # class = column
    image = np.stack([mask * 10] * 3, axis=-1).astype(np.uint8)  # a ramp: alignment and flips show
    row = {"image": image, "mask": mask}
    mixed = parse_mix_spec(spec(data, {"kind": "real"}, resize=24, crop=32, flip=True))
    out = transform(mixed, row, rng, 255)
    assert out["image"].shape == (32, 32, 3) and out["mask"].shape == (32, 32)
    labelled = out["mask"] != 255
    assert labelled.sum() == 24 * 32  # the resized 24 x 40 image, cropped to 32 wide, padded to 32 high
    # Bilinear image, nearest mask: the same geometry within a column's width.
    assert np.abs(out["image"][..., 0][labelled] / 10 - out["mask"][labelled]).max() <= 1
    assert (out["image"][~labelled] == 0).all()  # padding: black image, ignore mask
    photo = parse_mix_spec(spec(data, {"kind": "real"}, photometric=True))
    a = transform(photo, row, np.random.default_rng(1), 255)
    b = transform(photo, row, np.random.default_rng(1), 255)
    assert np.array_equal(a["image"], b["image"]) and not np.array_equal(a["image"], image)
    assert a["mask"] is mask
