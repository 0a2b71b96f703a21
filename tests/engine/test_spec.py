import copy
import json

import pytest
import yaml
from helpers import REPO

from factory.engine.spec import dump_spec, inline_credentials, load_spec, parse_spec, redacted_spec
from factory.schema import SpecError
from factory.storage import SecretNotSet, resolve_secrets, url_to_fs

pytestmark = pytest.mark.timeout(60)

GOOD = {
    "name": "t",
    "seed": 1,
    "source": {"kind": "folder", "path": "x", "classes": "ade150"},
    "stages": [{"kind": "controlnet", "model": {"profile": "tiny"}, "params": {"variants": 2, "steps": 2}}],
    "output": {"url": "out", "shard_size": 4},
}


def bad(path: str, value):
    data = copy.deepcopy(GOOD)
    node = data
    *parents, leaf = path.split(".")
    for p in parents:
        node = node[int(p)] if p.isdigit() else node[p]
    if value is KeyError:
        del node[leaf]
    else:
        node[leaf] = value
    return data


def test_good_spec_fills_stage_defaults():
    spec = parse_spec(copy.deepcopy(GOOD))
    assert spec.stages[0].params["guidance"] == 7.5
    assert spec.stages[0].params["variants"] == 2


@pytest.mark.parametrize(
    "path,value,message",
    [
        ("output.shard_size", 0, "output.shard_size"),
        ("output.image_format", "gif", "output.image_format"),
        ("output.url", KeyError, "output.url"),
        ("source.kind", "imagenet", "source.kind"),
        ("stages.0.kind", "nope", "stages[0].kind: unknown stage 'nope'"),
        ("stages.0.params", {"steps": -1}, "stages[0].params.steps"),
        ("stages.0.params", {"stepz": 3}, "stages[0].params.stepz"),
        ("stages.0.model", {"profile": "huge"}, "stages[0].model.profile"),
        ("name", "has.dot", "name"),
        ("seed", "x", "seed"),
    ],
)
def test_bad_fields_are_named(path, value, message):
    with pytest.raises(SpecError) as e:
        parse_spec(bad(path, value))
    assert message in str(e.value)


def test_folder_source_needs_classes():
    with pytest.raises(SpecError, match="classes"):
        parse_spec(bad("source.classes", KeyError))


def test_gpu_on_cpu_only_stage_is_refused():
    data = copy.deepcopy(GOOD)
    data["stages"] = [{"kind": "stages_for_tests:FloatImageStage", "resources": {"num_gpus": 1}}]
    with pytest.raises(SpecError, match=r"stages\[0\].resources.num_gpus"):
        parse_spec(data)


def test_hash_ignores_where_and_how_but_not_what():
    a = parse_spec(copy.deepcopy(GOOD))
    moved = copy.deepcopy(GOOD)
    moved["output"].update(
        url="s3://elsewhere",
        shared_filesystem=True,
        endpoint_url="http://minio:9000",
        storage_options={"key": "AKIA", "secret": "s3cr3t"},
    )
    moved["source"]["storage_options"] = {"token": "abc"}
    moved["stages"][0]["model"]["storage_options"] = {"secret": "other"}
    moved["stages"][0]["resources"] = {"num_gpus": 1, "concurrency": 8}
    moved["engine"] = {"retries": 9}
    assert parse_spec(moved).content_hash() == a.content_hash()
    assert parse_spec(bad("seed", 2)).content_hash() != a.content_hash()
    assert parse_spec(bad("stages.0.params", {"variants": 3})).content_hash() != a.content_hash()
    # What shares a batch decides the bytes a batched model makes: the batch size is part of the job.
    assert parse_spec(bad("stages.0.resources", {"batch_size": 32})).content_hash() != a.content_hash()


def test_credentials_are_redacted_from_the_stored_spec():
    data = copy.deepcopy(GOOD)
    data["output"]["storage_options"] = {
        "key": "AKIA-ID",
        "secret": "s3cr3t",
        "client_kwargs": {"endpoint_url": "http://s3", "aws_session_token": "sess-XYZ-123"},
    }
    data["stages"][0]["model"]["storage_options"] = {"password": "hunter2", "anon": False}
    stored = redacted_spec(parse_spec(data))
    text = json.dumps(stored)
    assert not any(secret in text for secret in ("AKIA-ID", "s3cr3t", "sess-XYZ-123", "hunter2"))
    assert stored["output"]["storage_options"]["client_kwargs"]["endpoint_url"] == "http://s3"
    assert stored["stages"][0]["model"]["storage_options"]["anon"] is False


def test_load_spec_with_overrides_and_yaml_errors(tmp_path):
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(GOOD))
    spec = load_spec(p, {"output.url": "elsewhere", "output.shard_size": 9})
    assert (spec.output.url, spec.output.shard_size) == ("elsewhere", 9)
    p.write_text("name: [unclosed")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(p)
    with pytest.raises(SpecError, match="no such file"):
        load_spec(tmp_path / "missing.yaml")


def test_every_shipped_job_spec_validates():

    from factory.downstream.eval import load_eval_spec
    from factory.seggen.spec import load_train_spec

    # Each kind of spec has its own schema: `factory train` specs are train_*.yaml, `factory eval` specs
    # have arms; every other file is a job spec (eval_toy_true_scenes.yaml makes an eval input).
    jobs = sorted((REPO / "jobs").glob("*.yaml"))
    kinds = {
        job: "train"
        if job.name.startswith("train_")
        else "eval"
        if "arms" in yaml.safe_load(job.read_text())
        else "job"
        for job in jobs
    }
    assert set(kinds.values()) == {"train", "eval", "job"}
    for job, kind in kinds.items():
        {"train": load_train_spec, "eval": load_eval_spec, "job": load_spec}[kind](job)


def test_set_steps_into_lists_and_names_bad_paths(tmp_path):
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(GOOD))
    assert load_spec(p, {"stages.0.params.steps": 4}).stages[0].params["steps"] == 4
    with pytest.raises(SpecError, match="stages.3"):
        load_spec(p, {"stages.3.params.steps": 4})
    with pytest.raises(SpecError, match="seed is not a mapping"):
        load_spec(p, {"seed.x": 1})


def test_every_field_that_can_carry_a_credential_is_redacted_and_env_names_are_kept():
    data = copy.deepcopy(GOOD)
    data["output"]["storage_options"] = {"key": "env:S3_KEY", "secret": "env:S3_SECRET", "anon": False}
    data["output"]["endpoint_url"] = "https://user:pa55word@s3.example.com"
    data["source"]["storage_options"] = {"client_kwargs": {"aws_secret_access_key": "inline-1"}, "hf_token": "hf_x"}
    spec = parse_spec(data)
    stored = redacted_spec(spec)
    text = json.dumps(stored)
    assert not any(secret in text for secret in ("pa55word", "inline-1", "hf_x"))
    assert stored["output"]["endpoint_url"] == "https://<redacted>@s3.example.com"
    assert stored["output"]["storage_options"] == {"key": "env:S3_KEY", "secret": "env:S3_SECRET", "anon": False}
    assert inline_credentials(dump_spec(spec)) == [
        "source.storage_options.client_kwargs.aws_secret_access_key",
        "source.storage_options.hf_token",
        "output.endpoint_url",
    ]


def test_names_that_only_look_like_credentials_are_not_taken_for_them():
    assert inline_credentials({"max_new_tokens": "64", "tokenizer": "t5", "keys": "a", "sort_key": "env:X"}) == []
    assert inline_credentials({"url": "s3://bucket/prefix", "token": ""}) == []


def test_env_credentials_are_read_where_the_filesystem_is_opened(monkeypatch):
    monkeypatch.setenv("FACTORY_TEST_TOKEN", "from-the-node")
    assert resolve_secrets({"a": {"token": "env:FACTORY_TEST_TOKEN"}, "b": ["env:FACTORY_TEST_TOKEN", 1]}) == {
        "a": {"token": "from-the-node"},
        "b": ["from-the-node", 1],
    }
    fs, _ = url_to_fs("memory://env-secrets", {"token": "env:FACTORY_TEST_TOKEN"})
    assert fs.storage_options["token"] == "from-the-node"
    monkeypatch.delenv("FACTORY_TEST_TOKEN")
    with pytest.raises(
        SecretNotSet, match=r"'env:FACTORY_TEST_TOKEN': the environment variable FACTORY_TEST_TOKEN is not"
    ):
        resolve_secrets({"token": "env:FACTORY_TEST_TOKEN"})
