"""Batch API files in an S3-compatible bucket (`AGORA_FILES_URL=s3://...`,
`coordinator/file_store.S3FileStore`), against moto's S3: the same API through the official
client as with the local folder, one object per file under the prefix, and a store that
cannot be reached is a 503, never a 500 or a file row without its bytes."""

from __future__ import annotations

import io

import boto3
import openai
import pytest
from fastapi.testclient import TestClient
from moto import mock_aws

from coordinator.account_service import create_account
from coordinator.app import create_app
from coordinator.db import create_all, make_engine
from coordinator.file_store import FileMissing, S3FileStore
from coordinator.runtime import Runtime
from coordinator.settings import CoordinatorSettings
from tests.coordinator.test_batch_api import _jsonl, _line

BUCKET = "agora-files"


@pytest.fixture
def s3(monkeypatch):
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    with mock_aws():
        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        yield client


def _market(tmp_path, **extra):
    settings = CoordinatorSettings(home=tmp_path, database_url=f"sqlite:///{tmp_path / 't.db'}",
                                   run_worker_in_process=False, **extra)
    engine = make_engine(settings.effective_database_url)
    create_all(engine)
    rt = Runtime(settings, engine=engine)
    with rt.session() as s:
        key = create_account(s, "buyer", 10**9)[1]
    return rt, key


def test_the_store_puts_gets_and_deletes_objects_under_its_prefix(s3):
    store = S3FileStore.from_url(f"s3://{BUCKET}/prod/files")
    store.put("file-abc", b"one\ntwo\n")
    assert store.get("file-abc") == b"one\ntwo\n"
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET)["Contents"]] == ["prod/files/file-abc"]
    store.delete("file-abc")
    with pytest.raises(FileMissing):
        store.get("file-abc")
    store.delete("file-abc")  # deleting twice is not an error
    with pytest.raises(ValueError):
        store.put("../escape", b"x")


def test_the_batch_api_keeps_its_files_in_the_bucket(s3, tmp_path):
    rt, key = _market(tmp_path, files_url=f"s3://{BUCKET}/agora")
    try:
        with TestClient(create_app(runtime=rt)) as http:
            oc = openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=http, max_retries=0)
            data = _jsonl([_line(i) for i in range(3)])
            f = oc.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
            assert s3.get_object(Bucket=BUCKET, Key=f"agora/{f.id}")["Body"].read() == data
            assert oc.files.content(f.id).content == data
            assert not (tmp_path / "files").exists()  # nothing on the local disk
            assert oc.files.delete(f.id).deleted
            assert s3.list_objects_v2(Bucket=BUCKET).get("KeyCount") == 0
    finally:
        rt.stop()


def test_an_unreachable_store_is_a_503_and_leaves_no_file_row(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    rt, key = _market(tmp_path, files_url=f"s3://{BUCKET}", files_s3_endpoint_url="http://127.0.0.1:9")  # nothing listens
    try:
        with TestClient(create_app(runtime=rt)) as http:
            oc = openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=http, max_retries=0)
            with pytest.raises(openai.InternalServerError) as exc:
                oc.files.create(file=("in.jsonl", io.BytesIO(_jsonl([_line(0)]))), purpose="batch")
            assert exc.value.status_code == 503 and exc.value.body["code"] == "file_store_unavailable"
            assert oc.files.list().data == []  # the row went with the failed put
    finally:
        rt.stop()


def test_a_bad_files_url_is_refused_at_start():
    with pytest.raises(ValueError):
        CoordinatorSettings(files_url="https://not-s3/bucket")
